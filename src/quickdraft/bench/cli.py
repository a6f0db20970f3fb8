"""Command-line front ends of ``quickdraft bench`` and ``quickdraft profile``.

The main CLI wires them in as subcommands::

    sub = subparsers.add_parser("bench", help=BENCH_HELP, description=BENCH_DESCRIPTION)
    add_bench_arguments(sub); sub.set_defaults(func=bench_main)
    sub = subparsers.add_parser("profile", help=PROFILE_HELP, description=PROFILE_DESCRIPTION)
    add_profile_arguments(sub); sub.set_defaults(func=profile_main)

Both mains return an exit code: 0 on success, 2 for a :class:`~quickdraft.errors.QuickdraftError` (printed
in red, without a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from quickdraft.cli_args import (
    add_datastore_argument,
    add_model_arguments,
    format_size,
    frees_transformers_weights,
    option_value,
)
from quickdraft.errors import InvalidRequestError, QuickdraftError
from quickdraft.models.quantized import DEFAULT_WEIGHTS

if TYPE_CHECKING:
    from rich.console import Console

    from quickdraft.bench.profile import CostPoint
    from quickdraft.bench.report import BenchReport

BENCH_HELP = "compare decoding methods on Spec-Bench-style prompts (speed, tau, losslessness)"
BENCH_DESCRIPTION = (
    "Benchmark quickdraft's plain decoding (ar, the baseline), its drafters and peer libraries on one loaded "
    "model. Speedup = a method's aggregate tokens/s (total new tokens / total seconds) over ar's in the same "
    "run; tau = tokens committed per target forward. Every method's tokens are compared with ar's."
)
PROFILE_HELP = "measure the target's verification cost curve c(k) on this hardware"
PROFILE_DESCRIPTION = (
    "Time one target forward over k new tokens on a ~300-token context, relative to k = 1 (median of several "
    "repeats); optionally rate each method of a bench JSON against the bound tau / (c(k) + draft cost)."
)
DEFAULT_METHODS = "ar,hf,hf-pld,ngram"
#: The default methods with ``--weights`` that frees the transformers model's weights (no transformers methods).
DEFAULT_QUANTIZED_METHODS = "ar,ngram"
#: The methods that run the transformers model (``generate``), which quantized weights leave without weights.
TRANSFORMERS_METHODS = ("hf", "hf-pld", "hf-assisted")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``quickdraft bench``."""
    add_model_arguments(parser, run_dependent_weights=True)
    parser.add_argument("--dataset", metavar="PATH", default=None,
                        help="Spec-Bench-format JSONL (question_id, category, turns per line); "
                             "default: the built-in prompt set")
    parser.add_argument("--per-category", metavar="N", type=int, default=None,
                        help="first N questions of each task group (MT-Bench's 8 categories count as one group, "
                             "'multi-turn'); default: all")
    parser.add_argument("--methods", default=None,
                        help="comma-separated: ar (baseline, always run), any registered drafter (NAME@N: with "
                             "a fixed budget of N draft nodes per step instead of the adaptive one), hf, hf-pld, "
                             "hf-assisted (needs --draft-model), llamacpp, vllm, vllm-ngram, vllm+NAME[@K] (vLLM "
                             "in .venv-vllm: make setup-vllm; NAME a token-only drafter, K speculative tokens) "
                             f"(default: {DEFAULT_METHODS}; "
                             f"{DEFAULT_QUANTIZED_METHODS} with --weights other than dense)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per answer (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with temperature > 0 (default: 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of sampling and of the shuffled method order per question (default: 0)")
    parser.add_argument("--draft-model", metavar="PATH", default=None, help="draft model for hf-assisted")
    parser.add_argument("--drafter-option", metavar="[METHOD:]KEY=VALUE", action="append", default=[],
                        help="option for a drafter method (repeatable); without METHOD: for every drafter method. "
                             "VALUE is read as an int, a float or true/false where it is one, else as a string")
    add_datastore_argument(parser)
    parser.add_argument("--warmup-tokens", type=int, default=None,
                        help="length of each method's untimed warm-up generation (default: --max-new-tokens)")
    parser.add_argument("--llamacpp-threads", type=int, default=None, help="threads for llamacpp (default: torch's)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the report as JSON")
    parser.add_argument("--plot", metavar="OUT.png", default=None, help="write a bar chart of speedup per task group")


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``quickdraft profile``."""
    add_model_arguments(parser, run_dependent_weights=True)
    parser.add_argument("--ks", default=None, help="comma-separated k values, e.g. 1,2,4,8,16,32,64 (default: 1..64)")
    parser.add_argument("--context", type=int, default=300, help="tokens already in the KV cache (default: 300)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per k; the median is kept (default: 7)")
    parser.add_argument("--backend", choices=("auto", "engine", "hf"), default="auto",
                        help="engine: the engine's own verification forward; hf: a transformers forward "
                             "(default: auto, the engine's where available)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the curve as JSON")
    parser.add_argument("--bench-json", metavar="FILE", default=None,
                        help="a quickdraft bench --json report: print each method's efficiency against its bound")
    parser.add_argument("--curve", metavar="FILE", default=None,
                        help="use a curve saved by profile --json instead of measuring (no model is loaded)")


def parse_drafter_options(items: Sequence[str], methods: Sequence[str],
                          datastore: str | None = None) -> dict[str, dict[str, Any]]:
    """``["ngram:n=3", "k=4"]`` -> per-method option dicts (an unscoped option goes to every drafter method);
    values are read as by ``quickdraft generate --drafter-option`` (:func:`quickdraft.cli_args.option_value`).
    ``datastore`` goes to every drafter method that takes one."""
    from quickdraft.bench.runners import BASELINE, PEERS

    drafters = [m for m in methods if m != BASELINE and m not in PEERS]
    options: dict[str, dict[str, Any]] = {m: {} for m in drafters}
    for item in items:
        if "=" not in item:
            raise InvalidRequestError(f"--drafter-option {item!r} must look like KEY=VALUE or METHOD:KEY=VALUE")
        left, raw = item.split("=", 1)
        method, _, key = left.rpartition(":")
        if not key:
            raise InvalidRequestError(f"--drafter-option {item!r} has no key")
        targets = [method] if method else drafters
        for target in targets:
            if target not in options:
                raise InvalidRequestError(
                    f"--drafter-option {item!r} names {target!r}, which is not a drafter method in --methods"
                )
            options[target][key] = option_value(raw)
    if datastore:
        _add_datastore(options, datastore)
    return {m: o for m, o in options.items() if o}


def _add_datastore(options: dict[str, dict[str, Any]], datastore: str) -> None:
    from quickdraft.bench.runners import parse_method
    from quickdraft.drafters import drafter_class

    takers = [m for m in options if "datastore" in drafter_class(parse_method(m)[0]).accepted_options()]
    if not takers:
        raise InvalidRequestError("--datastore is for the suffix and auto drafters; add one of them to --methods")
    for method in takers:
        options[method]["datastore"] = datastore


def bench_methods(spec: str | None, weights: str | None) -> tuple[list[str], str]:
    """The methods of ``--methods`` (None: the default) and the weights mode to load with: ``--weights`` as
    given, or where it is omitted (None) ``dense`` if a method runs the transformers model, else the library's
    default. Raises InvalidRequestError, before anything loads, for a transformers method with ``--weights``
    that frees the transformers model's weights."""
    from quickdraft.bench.runners import split_methods

    if spec is None:
        quantized = weights is not None and frees_transformers_weights(weights)
        spec = DEFAULT_QUANTIZED_METHODS if quantized else DEFAULT_METHODS
    methods = split_methods(spec)
    refused = [m for m in methods if m in TRANSFORMERS_METHODS]
    if weights is None:
        return methods, "dense" if refused else DEFAULT_WEIGHTS
    if refused and frees_transformers_weights(weights):
        freed = "may free (if it chooses a quantized mode)" if weights == "auto" else "frees"
        raise InvalidRequestError(
            f"--weights {weights} {freed} the transformers model's weights, so the transformers methods "
            f"{', '.join(refused)} cannot run; leave them out of --methods "
            f"(e.g. --methods {','.join(m for m in methods if m not in refused)}), or pass --weights dense")
    return methods, weights


def _error(message: str) -> int:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]")
    return 2


def bench_main(args: argparse.Namespace) -> int:
    """Run ``quickdraft bench`` with parsed ``args``; returns the exit code."""
    try:
        return _bench(args)
    except QuickdraftError as error:
        return _error(str(error))


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from quickdraft.bench.dataset import load_questions
    from quickdraft.bench.harness import count_generations
    from quickdraft.bench.report import render_table
    from quickdraft.bench.run import run_bench
    from quickdraft.bench.runners import check_methods, parse_method
    from quickdraft.drafters import check_drafter_options
    from quickdraft.engine import check_max_new_tokens
    from quickdraft.types import SamplingParams

    console = Console()
    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    questions = load_questions(args.dataset, args.per_category)
    methods, weights = bench_methods(args.methods, args.weights)
    check_methods(methods, draft_model=args.draft_model, params=params)
    options = parse_drafter_options(args.drafter_option, methods, args.datastore)
    for method, method_options in options.items():
        check_drafter_options(parse_method(method)[0], method_options)

    from quickdraft.engine import Engine

    with console.status("loading the model ..."):
        engine = Engine.from_pretrained(args.model, None, dtype=args.dtype, device=args.device, weights=weights)
    settings = {
        "dataset": args.dataset or "built-in",
        "per_category": args.per_category,
        "command": list(getattr(args, "argv", None) or sys.argv),
    }
    with progress_bar(console, "building methods", count_generations(questions, len(methods))) as step:
        report = run_bench(engine, questions, methods, max_new_tokens=args.max_new_tokens, params=params,
                           draft_model=args.draft_model, drafter_options=options, warmup_tokens=args.warmup_tokens,
                           llamacpp_threads=args.llamacpp_threads, settings=settings,
                           on_generation=lambda method, label: step(f"{method:>12} {label}"))
    _add_vllm_summary(report, methods, console)
    render_table(report, console)
    _write_report_files(report, args, console)
    return 0


@contextmanager
def progress_bar(console: Console, description: str, total: int) -> Iterator[Callable[..., None]]:
    """A transient bar over ``total`` steps; yields ``step(description=None)``, which advances it by one and
    optionally replaces its description."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda new_description=None: progress.update(task, advance=1, description=new_description)


def _add_vllm_summary(report: BenchReport, methods: Sequence[str], console: Console) -> None:
    """Record vLLM's version and its methods' agreement with plain vLLM decoding, where vLLM ran."""
    from quickdraft.bench.vllm_peer import is_vllm_method, summary_line, vllm_summary

    if any(is_vllm_method(m) for m in methods):
        report.settings["vllm"] = vllm_summary(report.run)
        console.print(summary_line(report.settings["vllm"]))


def _write_report_files(report: BenchReport, args: argparse.Namespace, console: Console) -> None:
    """The JSON report and the speedup plot, where ``--json`` / ``--plot`` ask for them."""
    from quickdraft.bench.report import plot_speedups

    if args.json:
        report.write_json(args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(report, args.plot)
        console.print(f"wrote {args.plot}")


def profile_main(args: argparse.Namespace) -> int:
    """Run ``quickdraft profile`` with parsed ``args``; returns the exit code."""
    try:
        return _profile(args)
    except QuickdraftError as error:
        return _error(str(error))


def _profile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from quickdraft.bench import profile as prof

    console = Console()
    bench = prof.read_bench_json(args.bench_json) if args.bench_json else None
    if args.curve:
        curve, settings = _saved_curve(args.curve)
    else:
        curve, settings = _measured_curve(args, console)
    _print_curve(curve, settings, console)
    if args.json and not args.curve:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(prof.curve_to_json(curve, settings), indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if bench is not None:
        _print_efficiency(bench, curve, settings, console)
    return 0


def _saved_curve(path: str) -> tuple[list[CostPoint], dict[str, Any]]:
    """The curve and settings in a file written by ``quickdraft profile --json``."""
    from quickdraft.bench import profile as prof

    saved = prof.read_bench_json(path)
    try:
        curve = [prof.CostPoint(int(p["k"]), float(p["seconds"]), float(p["cost"])) for p in saved["curve"]]
    except (KeyError, TypeError, ValueError):
        raise InvalidRequestError(f"{path!r} is not a curve written by quickdraft profile --json") from None
    return curve, {k: v for k, v in saved.items() if k != "curve"}


def _measured_curve(args: argparse.Namespace, console: Console) -> tuple[list[CostPoint], dict[str, Any]]:
    """Time forwards over each of ``--ks`` rows on the model, with a progress bar."""
    from quickdraft.bench import profile as prof
    from quickdraft.bench.run import engine_settings
    from quickdraft.engine import Engine

    ks = prof.parse_ks(args.ks)
    if args.context < 1:
        raise InvalidRequestError(f"--context must be >= 1, got {args.context}")
    weights = args.weights or ("dense" if args.backend == "hf" else DEFAULT_WEIGHTS)
    if args.backend == "hf" and frees_transformers_weights(weights):
        raise InvalidRequestError(f"--backend hf times the transformers model, whose weights --weights "
                                  f"{weights} may free; pass --backend engine, or --weights dense")
    with console.status("loading the model ..."):
        engine = Engine.from_pretrained(args.model, None, dtype=args.dtype, device=args.device, weights=weights)
    timer = prof.make_timer(engine, ks, args.backend, args.context)
    with progress_bar(console, "timing forwards", args.repeats * len(ks)) as step:
        curve = prof.measure_cost_curve(timer, ks, args.repeats, on_measure=lambda k: step())
    settings = {**engine_settings(engine), "context": args.context, "repeats": args.repeats, "backend": timer.name}
    return curve, settings


def _print_curve(curve: list[CostPoint], settings: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    console.print(f"model {settings.get('model', '?')} ({settings.get('dtype', '?')}, {settings.get('device', '?')}, "
                  f"weights {settings.get('weights') or '?'}{_resident(settings)}); "
                  f"forward: {settings.get('backend', '?')}; context {settings.get('context', '?')} tokens, "
                  f"median of {settings.get('repeats', '?')}")
    table = Table(title="verification cost c(k)", title_justify="left")
    table.add_column("k", justify="right")
    table.add_column("ms", justify="right")
    table.add_column("c(k)", justify="right")
    for point in curve:
        table.add_row(str(point.k), f"{point.seconds * 1000:.2f}", f"{point.cost:.2f}")
    console.print(table)


def _resident(settings: dict[str, Any]) -> str:
    """``", resident 612.3 MB"`` from the settings' ``resident_bytes`` (the process's resident memory after
    loading), or nothing where it is unknown."""
    count = settings.get("resident_bytes")
    return f", resident {format_size(count)}" if count else ""


def _print_efficiency(bench: dict[str, Any], curve: list[CostPoint], settings: dict[str, Any],
                      console: Console) -> None:
    """Each method's measured speedup against the bound its tau and the curve allow."""
    from rich.table import Table

    from quickdraft.bench import profile as prof

    for key in ("model", "dtype", "weights", "device"):
        if key in bench and key in settings and bench[key] != settings[key]:
            console.print(f"[yellow]note: the bench ran with {key} {bench[key]!r}, "
                          f"this curve with {settings[key]!r}[/yellow]")
    table = Table(title="efficiency = measured speedup / (tau / (c(k) + d))", title_justify="left")
    for column in ("method", "speedup", "tau", "k", "c(k)", "d", "bound", "efficiency", "assumed"):
        table.add_column(column, justify="left" if column in ("method", "assumed") else "right")
    for row in prof.efficiency_table(bench, curve):
        table.add_row(row["method"], _cell(row["speedup"]), _cell(row["tau"]), _cell(row["k"]), _cell(row["cost"]),
                      _cell(row["draft_cost"]), _cell(row["bound"]), _cell(row["efficiency"]),
                      "; ".join(row["assumed"]))
    console.print(table)


def _cell(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m quickdraft.bench.cli bench|profile ...``) until the main CLI wires these in."""
    parser = argparse.ArgumentParser(prog="quickdraft")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help=BENCH_HELP, description=BENCH_DESCRIPTION)
    add_bench_arguments(bench)
    bench.set_defaults(func=bench_main)
    profile = sub.add_parser("profile", help=PROFILE_HELP, description=PROFILE_DESCRIPTION)
    add_profile_arguments(profile)
    profile.set_defaults(func=profile_main)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = ["quickdraft", *argv]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
