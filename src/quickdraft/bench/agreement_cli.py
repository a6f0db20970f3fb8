"""``quickdraft agreement``: quantized weights against the exact reference (dense float32) on benchmark
questions; see :mod:`quickdraft.bench.agreement` for the terms."""

from __future__ import annotations

import argparse
import json
from typing import Any

from quickdraft.bench.dataset import load_questions
from quickdraft.cli_args import add_model_path_argument
from quickdraft.errors import InvalidRequestError
from quickdraft.models.quantized import WEIGHT_MODES

AGREEMENT_HELP = "compare quantized weights' greedy answers with dense float32's (identical answers, top-1 agreement)"


def add_agreement_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_path_argument(parser)
    parser.add_argument("--weights", default="auto,int8",
                        help="comma-separated weights modes to compare with dense float32 (default: auto,int8)")
    parser.add_argument("--dtype", default="auto", help="activation dtype of the compared modes (default: auto)")
    parser.add_argument("--dataset", metavar="PATH", default=None,
                        help="Spec-Bench-format JSONL; first turns are asked (default: the built-in prompt set)")
    parser.add_argument("--per-category", metavar="N", type=int, default=None,
                        help="first N questions of each task group (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per answer (default: 128)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON")


def agreement_main(args: argparse.Namespace) -> int:
    """Run ``quickdraft agreement``; returns the exit code (errors are reported by :func:`quickdraft.cli.main`)."""
    from rich.console import Console

    from quickdraft.bench.agreement import measure_agreement
    from quickdraft.bench.cli import progress_bar
    from quickdraft.engine import Engine, check_max_new_tokens

    console = Console()
    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    modes = [(weights, args.dtype) for weights in _weights_list(args.weights)]
    questions = load_questions(args.dataset, args.per_category)

    def load(weights: str, dtype: str) -> Any:
        return Engine.from_pretrained(args.model, None, dtype=dtype, weights=weights)

    steps = len(questions) * (1 + 2 * len(modes))
    with progress_bar(console, "answering", steps) as step:
        results = measure_agreement(load, modes, questions, args.max_new_tokens, on_answer=step)
    _print_table(results, console)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"max_new_tokens": args.max_new_tokens, "questions": len(questions),
                       "dataset": args.dataset or "built-in", "per_category": args.per_category,
                       "results": [r.to_json() for r in results]}, out, indent=1)
        console.print(f"wrote {args.json}")
    return 0


def _weights_list(spec: str) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in modes if m not in WEIGHT_MODES]
    if not modes or unknown:
        raise InvalidRequestError(f"--weights takes a comma-separated list of {', '.join(WEIGHT_MODES)}; "
                                  f"got {spec!r}")
    return modes


def _print_table(results: list[Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title="against dense float32 (greedy, first turns)")
    for column in ("weights", "dtype", "identical answers", "top-1 agreement"):
        table.add_column(column)
    for r in results:
        table.add_row(r.weights, r.dtype, f"{r.identical}/{r.answers}",
                      f"{r.top1_agreement:.2%} ({r.agreeing}/{r.positions})")
    console.print(table)
