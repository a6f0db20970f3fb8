"""``quickdraft serve``: load a model, start the batch scheduler, serve the OpenAI API with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any

from quickdraft.cli_args import add_drafter_arguments, add_model_arguments, console, drafter_options
from quickdraft.draft_budget import DEFAULT_MAX_DRAFT
from quickdraft.errors import QuickdraftError

log = logging.getLogger(__name__)


#: The largest draft budget ``--max-draft`` accepts.
MAX_DRAFT_LIMIT = 64


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``quickdraft serve``: the model, the drafter (``--draft-budget N`` fixes N draft nodes
    per sequence and step, as in ``generate``; ``--max-draft`` caps the load-adaptive budget), and the server."""
    add_model_arguments(parser)
    add_drafter_arguments(parser)
    parser.add_argument("--max-draft", type=int, default=None, metavar="N",
                        help="the largest draft budget per sequence the load-adaptive policy may choose "
                             f"(default: {DEFAULT_MAX_DRAFT}; not with --draft-budget, which fixes the budget)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("QUICKDRAFT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every request (default: $QUICKDRAFT_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache rows)")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="prompt + completion tokens per request (capped by the model's context); "
                             "sets the KV cache size: max-batch rows of this length")
    parser.add_argument("--served-model-name", default=None,
                        help="model id clients pass as 'model' (default: the model file or directory name)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 above)")
    parser.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503 overloaded")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until interrupted. Bad arguments or models raise QuickdraftError (exit status 2)."""
    import uvicorn

    from quickdraft.devices import dtype_name, leave_cpu_threads_to_a_worker
    from quickdraft.engine import Engine, check_drafter
    from quickdraft.server.app import create_app

    _check_args(args)
    check_drafter(args.drafter, drafter_options(args))
    threads = leave_cpu_threads_to_a_worker(args.threads)  # the scheduler thread decodes, with these
    listener = _bind(args.host, args.port)  # fail fast (port in use) before loading the model
    try:
        engine = Engine.from_pretrained(args.model, None, args.dtype, args.device, weights=args.weights)
        options = shared_drafter_options(drafter_options(args), engine)
        name = args.served_model_name or _default_name(engine.model_path)
        budget = ("measuring the verification cost curve..." if args.draft_budget is None
                  else f"fixed draft budget {args.draft_budget}")
        console.print(f"[dim]model {engine.model_path} ({dtype_name(engine.dtype)}, weights "
                      f"{engine.loaded.weights}), drafter {args.drafter}, max batch {args.max_batch}; {budget}[/dim]")
        scheduler = _start_scheduler(engine, options, args, threads)
    except BaseException:
        listener.close()
        raise
    if scheduler.cost_curve is not None and args.draft_budget is None:
        curve = scheduler.cost_curve
        points = ", ".join(f"c({r})={c:.2f}" for r, c in zip(curve.rows, curve.relative_cost, strict=True))
        console.print(f"[dim]cost curve: {points}[/dim]")
    if not _is_loopback(args.host) and not args.api_key:
        console.print(f"[bold yellow]warning:[/bold yellow] listening on {args.host} without --api-key: anyone who "
                      "can reach this address can use the server")
    console.print(f"serving [bold]{name}[/bold] at http://{args.host}:{listener.getsockname()[1]}/v1 "
                  f"(OpenAI API){' with API key' if args.api_key else ''}")
    app = create_app(scheduler, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="off", timeout_graceful_shutdown=5,
                            limit_concurrency=max(64, args.max_waiting + args.max_batch + 16))
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        scheduler.close()
        listener.close()
    return 0


def _start_scheduler(engine: Any, options: dict[str, Any], args: argparse.Namespace,
                     threads: int | None = None) -> Any:
    """A started :class:`~quickdraft.batching.BatchScheduler`: the load-adaptive budget up to ``--max-draft``
    (on the cost curve measured at start), or ``--draft-budget`` draft nodes for every sequence and step (no
    curve is measured: a fixed budget does not read it)."""
    from quickdraft.batching import BatchScheduler
    from quickdraft.budget import CostCurve
    from quickdraft.draft_budget import FixedBudget

    fixed = args.draft_budget
    max_draft = fixed if fixed is not None else args.max_draft if args.max_draft is not None else DEFAULT_MAX_DRAFT
    scheduler = BatchScheduler(engine, args.drafter, options, max_batch=args.max_batch, max_draft=max_draft,
                               max_seq_len=args.max_seq_len, max_waiting=args.max_waiting,
                               cost_curve=CostCurve.flat() if fixed is not None else None, threads=threads)
    scheduler.start()
    if fixed is not None and scheduler.max_draft > 0:
        scheduler.policy = FixedBudget(fixed)  # before any request: the server is not listening yet
    return scheduler


def _check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.max_batch <= 1024:
        raise QuickdraftError(f"--max-batch must be between 1 and 1024, got {args.max_batch}")
    if args.max_seq_len < 2:
        raise QuickdraftError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.draft_budget is not None and args.max_draft is not None:
        raise QuickdraftError("--draft-budget fixes the draft budget and --max-draft caps the adaptive one; "
                              "pass one of them")
    for flag, value in (("--draft-budget", args.draft_budget), ("--max-draft", args.max_draft)):
        if value is not None and not 0 <= value <= MAX_DRAFT_LIMIT:
            raise QuickdraftError(f"{flag} must be between 0 and {MAX_DRAFT_LIMIT} for serve, got {value}")
    if not 0 <= args.port <= 65535:
        raise QuickdraftError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_body_bytes < 1024:
        raise QuickdraftError("--max-body-bytes must be at least 1024")
    if args.api_key is not None and not args.api_key.strip():
        raise QuickdraftError("--api-key is empty")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise QuickdraftError(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                              "pick another --port or --host") from error
    return listener


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_name(path: str) -> str:
    name = Path(path).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def shared_drafter_options(options: dict[str, Any], engine: Any) -> dict[str, Any]:
    """A draft model or a datastore given as a path (``--drafter-option model=PATH``, ``--datastore STORE``) is
    loaded once here and shared by the drafter of every batch slot, instead of once per slot."""
    datastore = options.get("datastore")
    if isinstance(datastore, str):
        from quickdraft.drafters.datastore import load_datastore

        options["datastore"] = load_datastore(datastore)
    model = options.get("model")
    if isinstance(model, str):
        from quickdraft.models.loading import load_draft_model

        options["model"] = load_draft_model(model, options.pop("dtype", None) or engine.dtype, engine.device).target
    return options
