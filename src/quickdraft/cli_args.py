"""What the ``quickdraft`` commands share: argument builders, option parsing, the status console.

A leaf module: it imports nothing from the command modules (``quickdraft.cli``, ``quickdraft.bench.cli``,
``quickdraft.server.cli``), which all import from it, so they never import each other back.

Terms:

- *model arguments*: ``--model``, ``--dtype``, ``--device`` and ``--weights``, declared once here
  (:func:`add_model_arguments`) for ``generate``, ``demo``, ``bench``, ``profile`` and ``serve``.
- *weights mode* (``--weights``): how the native forward holds its linear weights, ``dense`` (float, the exact
  reference), ``int8``, ``int4`` or ``auto`` (:mod:`quickdraft.models.quantized`). The quantized modes free
  the transformers model's float weights once packed.
- *draft budget* (``--draft-budget N``): a fixed number of draft nodes verified per step, in every command;
  omitted, the budget is chosen per step (adaptive). ``serve --max-draft N`` caps the adaptive choice instead.
- *drafter option* (``--drafter-option KEY=VALUE``): an option for the drafter's constructor; the value is read
  by :func:`option_value`.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from quickdraft.errors import QuickdraftError
from quickdraft.models.quantized import DEFAULT_WEIGHTS, QUANTIZED_MODES, WEIGHT_MODES

#: Where the commands print status and errors (stderr); results go to stdout.
console = Console(stderr=True, soft_wrap=True)

MODEL_HELP = "model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"
WEIGHTS_HELP = ("how the native forward holds its weights: dense (float, the exact reference), int8 (per output "
                "channel), int4 (a GGUF file's own 4-bit groups, int8 for the rest; CPU only), or auto (the fastest "
                "here of the choices that keep a GGUF file's own weights; measured once per machine and cached)")
#: ``--weights``'s default in commands that can time the transformers model, which quantized weights free.
RUN_DEPENDENT_WEIGHTS = f"{DEFAULT_WEIGHTS}, or dense where the run times the transformers model"
DRAFT_BUDGET_HELP = "a fixed number of draft nodes verified per step (default: chosen per step, adaptive)"


def option_value(raw: str) -> Any:
    """A drafter option's value from the command line: an int, a float, true/false, or else the string."""
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return raw


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read by :func:`option_value`."""
    if "=" not in text:
        raise QuickdraftError(f"--drafter-option expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key, option_value(raw)


def add_model_path_argument(parser: argparse.ArgumentParser, text: str = MODEL_HELP) -> None:
    """``--model PATH`` (None: the embedded default model), with help ``text``."""
    parser.add_argument("--model", default=None, help=text)


def add_model_arguments(parser: argparse.ArgumentParser, run_dependent_weights: bool = False) -> None:
    """``--model``, ``--dtype``, ``--device`` and ``--weights``: which model to load, and how (see
    :func:`add_loading_arguments`)."""
    add_model_path_argument(parser)
    add_loading_arguments(parser, run_dependent_weights)


def add_loading_arguments(parser: argparse.ArgumentParser, run_dependent_weights: bool = False) -> None:
    """``--dtype``, ``--device`` and ``--weights``: how to load the model (for a tool that names it its own way).
    ``run_dependent_weights``: ``--weights`` defaults to None, which the command resolves
    (:data:`RUN_DEPENDENT_WEIGHTS`), instead of :data:`DEFAULT_WEIGHTS`."""
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 where the hardware computes it natively), float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    default = None if run_dependent_weights else DEFAULT_WEIGHTS
    parser.add_argument("--weights", choices=_weight_choices(), default=default,
                        help=f"{WEIGHTS_HELP} (default: {RUN_DEPENDENT_WEIGHTS if default is None else default})")


def _weight_choices() -> list[str]:
    """The weights modes, ``auto`` first (the order of ``--help``)."""
    return sorted(WEIGHT_MODES, key=lambda mode: mode != "auto")


def frees_transformers_weights(weights: str) -> bool:
    """Whether loading with weights mode ``weights`` may free the transformers model's float weights (a
    quantized mode, or ``auto``, which may choose one), leaving that model unable to run."""
    return weights in QUANTIZED_MODES or weights == "auto"


def add_draft_budget_argument(parser: argparse.ArgumentParser) -> None:
    """``--draft-budget N``: fixed draft nodes per step; omitted (None): adaptive."""
    parser.add_argument("--draft-budget", type=int, default=None, metavar="N", help=DRAFT_BUDGET_HELP)


def add_datastore_argument(parser: argparse.ArgumentParser) -> None:
    """``--datastore STORE``: a datastore built by ``quickdraft index``."""
    parser.add_argument("--datastore", metavar="STORE", default=None,
                        help="a datastore built by `quickdraft index`, for the suffix and auto drafters "
                             "(the same as --drafter-option datastore=STORE)")


def add_drafter_arguments(parser: argparse.ArgumentParser) -> None:
    """``--drafter``, ``--drafter-option``, ``--draft-budget`` and ``--datastore``."""
    parser.add_argument("--drafter", default="auto",
                        help="drafter name, or 'none' for plain decoding (default: auto, the best on most text)")
    parser.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option passed to the drafter (repeatable), e.g. model=PATH for --drafter draft")
    add_draft_budget_argument(parser)
    add_datastore_argument(parser)


def drafter_options(args: argparse.Namespace) -> dict[str, Any]:
    """The drafter's options from ``--drafter-option`` items and ``--datastore``."""
    options = dict(parse_option(item) for item in args.drafter_option)
    if args.datastore:
        options["datastore"] = args.datastore
    return options


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--temperature``, ``--top-k``, ``--top-p``, ``--min-p`` and ``--seed``."""
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :class:`~quickdraft.types.SamplingParams` from the sampling arguments."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "seed": args.seed}


def format_size(count: int) -> str:
    """A byte count for people: 1.2 GB, 340.0 MB, 12.0 kB, 5 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
