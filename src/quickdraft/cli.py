"""The ``quickdraft`` command: generate | demo | bench | profile | agreement | index | serve | cache | train."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quickdraft.bench.agreement_cli import AGREEMENT_HELP, add_agreement_arguments, agreement_main
from quickdraft.bench.cli import add_bench_arguments, add_profile_arguments, bench_main, profile_main
from quickdraft.cli_args import (
    add_datastore_argument,
    add_draft_budget_argument,
    add_drafter_arguments,
    add_model_arguments,
    add_model_path_argument,
    add_sampling_arguments,
    console,
    drafter_options,
    format_size,
    parse_option,  # noqa: F401 - re-exported: `quickdraft.cli.parse_option` was public before cli_args
    sampling_options,
)
from quickdraft.errors import QuickdraftError
from quickdraft.server.cli import add_serve_arguments, serve_main
from quickdraft.train.cli import add_train_arguments, train_main

#: Where a command's results go (the demo's table and what explains it); status and errors go to ``console``.
results = Console()


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a reply to ``--prompt``, streamed to stdout; one line of stats to stderr."""
    from quickdraft.devices import dtype_name
    from quickdraft.engine import Engine, check_max_new_tokens, check_prompt
    from quickdraft.types import SamplingParams

    params = SamplingParams(**sampling_options(args))
    check_max_new_tokens(args.max_new_tokens)
    check_prompt(args.prompt)
    engine = Engine.from_pretrained(args.model, args.drafter, args.dtype, args.device, drafter_options(args),
                                    args.draft_budget, weights=args.weights)
    ids = engine.encode_prompt(args.prompt)
    run = engine.start(ids, args.max_new_tokens, params, args.stop)
    for chunk in run.chunks():
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = run.result().stats
    console.print(f"[dim]{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, tau {stats.tau:.2f}, "
                  f"drafter {stats.drafter}, dtype {dtype_name(engine.dtype)}, "
                  f"weights {engine.loaded.weights}[/dim]")
    return 0


DEMO_PROMPTS = [
    "Summarize in two sentences: The library will close for renovation from June to August. During this time, "
    "books can be returned at the community center, and the mobile library will visit each neighbourhood "
    "once a week. The renovated library will have a larger children's area, a cafe and twenty new computers.",
    "Rewrite this code so that the variable names are descriptive:\n\ndef f(a, b):\n    c = 0\n    for d in a:\n"
    "        if d > b:\n            c += d\n    return c\n",
    "What are three tips for staying focused while studying?",
]


#: The demo's methods by default: plain decoding (``ar``, the reference) and the two best drafters.
DEMO_METHODS = "ar,suffix,auto"


def demo_engines(args: argparse.Namespace) -> dict[str, Any]:
    """An engine per method of ``--methods`` on one loaded model: ``ar`` is plain decoding (always first, as
    the reference), any other name is a drafter; ``--datastore`` goes to the drafters that take one."""
    from quickdraft.drafters import check_drafter_options
    from quickdraft.engine import Engine

    names = dict.fromkeys(name.strip() for name in args.methods.split(",") if name.strip() not in ("", "ar"))
    classes = {name: check_drafter_options(name, {}) for name in names}  # unknown names fail before loading
    base = Engine.from_pretrained(args.model, None, args.dtype, args.device, weights=args.weights)
    engines = {"ar": base}
    for name, drafter_class in classes.items():
        takes_store = args.datastore and "datastore" in drafter_class.accepted_options()
        engines[name] = base.with_drafter(name, {"datastore": args.datastore} if takes_store else {},
                                          args.draft_budget)
    return engines


def cmd_demo(args: argparse.Namespace) -> int:
    """Plain decoding vs speculative decoding on a few built-in prompts, side by side."""
    import torch

    from quickdraft.devices import dtype_name

    methods = demo_engines(args)
    base = methods["ar"]
    totals = {name: [0, 0.0, 0] for name in methods}
    identical = {name: 0 for name in methods}
    warmup = base.encode_prompt("Say hello.")
    for engine in methods.values():  # untimed: first-call costs (and the cost curve, once per machine)
        engine.generate_ids(warmup, 8)
    for prompt in DEMO_PROMPTS:
        ids = base.encode_prompt(prompt)
        outputs = {}
        for name, engine in methods.items():
            started = time.perf_counter()
            result = engine.generate_ids(ids, args.max_new_tokens)
            totals[name][0] += result.stats.new_tokens
            totals[name][1] += time.perf_counter() - started
            totals[name][2] += result.stats.target_forwards
            outputs[name] = result.token_ids
        for name in methods:
            identical[name] += outputs[name] == outputs["ar"]
    dtype = dtype_name(base.dtype)
    _print_demo_table(totals, identical, len(DEMO_PROMPTS), dtype)
    all_identical = all(count == len(DEMO_PROMPTS) for count in identical.values())
    if base.dtype == torch.float32 and not all_identical:
        console.print("[bold red]speculative output differs from plain decoding: please report this bug[/bold red]")
        return 1
    if not all_identical:
        results.print(f"[dim]In {dtype} a forward over several tokens rounds "
                      "differently from one-token forwards, so a near-tie between the top two tokens can go the "
                      "other way; --dtype float32 is exact. `quickdraft bench` lists each divergence with its "
                      "top-2 logit gap.[/dim]")
    return 0


def _print_demo_table(totals: dict[str, list], identical: dict[str, int], count: int, dtype: str) -> None:
    table = Table(title=f"quickdraft demo: embedded model, {dtype}, {count} prompts")
    for column in ("method", "tokens/s", "speedup", "mean accepted (tau)", "identical to ar"):
        table.add_column(column)
    base_rate = totals["ar"][0] / totals["ar"][1]
    for name, (tokens, seconds, forwards) in totals.items():
        rate = tokens / seconds
        same = "-" if name == "ar" else f"{identical[name]}/{count}"
        table.add_row(name, f"{rate:.1f}", f"{rate / base_rate:.2f}x", f"{tokens / forwards:.2f}", same)
    results.print(table)


def cmd_cache(args: argparse.Namespace) -> int:
    """``quickdraft cache ls``: the cache's entries; ``quickdraft cache clear``: remove them all."""
    from quickdraft import cache

    if args.action == "clear":
        removed, freed = cache.clear()
        console.print(f"removed {removed} cache entries ({format_size(freed)}) from {cache.cache_root()}")
        return 0
    listed = cache.entries()
    table = Table(title=f"quickdraft cache: {cache.cache_root()}")
    for column in ("kind", "what", "size", "created"):
        table.add_column(column)
    for entry in listed:
        table.add_row(entry.kind, escape(entry.label), format_size(entry.size),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created)))
    results.print(table)
    results.print(f"{len(listed)} entries, {format_size(sum(entry.size for entry in listed))}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Build a suffix-automaton datastore over text files, for ``--drafter suffix`` (option datastore)."""
    from quickdraft.drafters.datastore import index_corpus
    from quickdraft.models.loading import load_tokenizer

    stats = index_corpus(args.corpus, load_tokenizer(args.model), args.output)
    console.print(f"indexed {stats['files']} file(s) into {args.output}: "
                  + ", ".join(f"{k} {v}" for k, v in stats.items() if k != "files"))
    console.print(f"use it with: --drafter suffix --datastore {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quickdraft", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    generate = sub.add_parser("generate", help="generate a reply, streamed to the terminal")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_model_arguments(generate)
    add_drafter_arguments(generate)
    add_sampling_arguments(generate)
    generate.set_defaults(handler=cmd_generate)

    demo = sub.add_parser("demo", help="plain vs speculative decoding on built-in prompts")
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.add_argument("--methods", default=DEMO_METHODS,
                      help=f"comma-separated: ar (plain decoding) and drafter names (default: {DEMO_METHODS})")
    add_draft_budget_argument(demo)
    add_model_arguments(demo)
    add_datastore_argument(demo)
    demo.set_defaults(handler=cmd_demo)

    cache = sub.add_parser("cache", help="list or clear the cache of converted models and cost curves")
    cache.add_argument("action", choices=["ls", "clear"], help="ls: list the entries; clear: remove them all")
    cache.set_defaults(handler=cmd_cache)

    index = sub.add_parser("index", help="build a retrieval datastore for the suffix drafter")
    index.add_argument("corpus", nargs="+", help="UTF-8 text files")
    index.add_argument("-o", "--output", required=True, help="datastore file to write (.npz)")
    add_model_path_argument(index, "model whose tokenizer to use (default: embedded)")
    index.set_defaults(handler=cmd_index)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """Subcommands whose modules live in their own packages."""
    bench = sub.add_parser("bench", help="Spec-Bench-style side-by-side benchmark")
    add_bench_arguments(bench)
    bench.set_defaults(handler=bench_main)
    profile = sub.add_parser("profile", help="measure the verification cost curve c(k)")
    add_profile_arguments(profile)
    profile.set_defaults(handler=profile_main)
    agreement = sub.add_parser("agreement", help=AGREEMENT_HELP)
    add_agreement_arguments(agreement)
    agreement.set_defaults(handler=agreement_main)
    serve = sub.add_parser("serve", help="OpenAI-compatible server with batched speculative decoding")
    add_serve_arguments(serve)
    serve.set_defaults(handler=serve_main)
    train = sub.add_parser("train", help="train an EAGLE-style or Medusa head for a model (self-distillation)")
    add_train_arguments(train)
    train.set_defaults(handler=train_main)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except QuickdraftError as error:
        console.print(f"[bold red]error:[/bold red] {escape(str(error))}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
