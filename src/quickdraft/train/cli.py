"""``quickdraft train --drafter eagle|medusa --model M -o DIR``: collect self-distilled data, train, save.

The collected samples are kept in ``DIR/samples.pt`` (``--resume`` reuses them and the last epoch's
checkpoint, ``DIR/train_state.pt``); the head itself is ``DIR/config.json`` + ``DIR/head.safetensors``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quickdraft.cli_args import add_loading_arguments, add_model_path_argument, console
from quickdraft.heads.build import new_head

SAMPLES_FILE = "samples.pt"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", choices=("eagle", "medusa"), required=True, help="the kind of head to train")
    add_model_path_argument(parser)
    add_loading_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="folder for the head, its samples and checkpoints")
    parser.add_argument("--prompts", default=None,
                        help="prompts file (.jsonl or one per line); default: questions the model writes itself")
    parser.add_argument("--num-prompts", type=int, default=256, help="prompts to answer (default 256)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length at most (default 256)")
    parser.add_argument("--gen-batch", type=int, default=16, help="prompts answered per batch (default 16)")
    parser.add_argument("--collect-seconds", type=float, default=None,
                        help="answer no new batch of prompts after this long (default: answer them all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=3, help="eagle: training-time-test steps (default 3)")
    parser.add_argument("--medusa-heads", type=int, default=4, help="medusa: heads K (default 4)")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size (default 8192)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse DIR's samples and continue from its checkpoint")
    parser.add_argument("--samples", default=None,
                        help="train on the samples.pt another run collected (an eagle run's serve a medusa head)")


def train_main(args: argparse.Namespace) -> int:
    from quickdraft.models.loading import load_model
    from quickdraft.train.data import chat_ids, collect, magpie_prompts, read_prompts
    from quickdraft.train.loop import TrainOptions, draft_vocabulary, train

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = load_model(args.model, args.dtype, args.device, native=True, weights="dense")
    options = TrainOptions(kind=args.drafter, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           steps=args.steps, medusa_heads=args.medusa_heads, draft_vocab_size=args.draft_vocab,
                           seed=args.seed)
    shape = {"num_heads": args.medusa_heads} if args.drafter == "medusa" else {}
    layers = new_head(args.drafter, loaded.target, loaded.tokenizer, [0], **shape).config.feature_layers
    samples_path = output / SAMPLES_FILE
    with _progress() as bar:
        if args.samples or (args.resume and samples_path.is_file()):
            source = Path(args.samples) if args.samples else samples_path
            samples = as_features(torch.load(source, weights_only=False), layers, loaded.target)
            console.print(f"reusing {len(samples)} samples from {source}")
        else:
            task = bar.add_task("writing prompts", total=args.num_prompts)
            if args.prompts:
                prompts = [chat_ids(loaded.tokenizer, p) for p in read_prompts(args.prompts)[: args.num_prompts]]
            else:
                prompts = magpie_prompts(loaded, args.num_prompts, args.gen_batch, args.seed)
            bar.update(task, completed=args.num_prompts)
            task = bar.add_task("answering", total=len(prompts))
            samples = collect(loaded, prompts, layers, args.max_new_tokens, args.gen_batch,
                              lambda n: bar.advance(task, n), args.collect_seconds)
            torch.save(samples, samples_path)
        tokens = sum(len(s.tokens) for s in samples)
        console.print(f"{len(samples)} samples, {tokens} tokens, data ready after "
                      f"{time.perf_counter() - started:.0f} s")
        head = new_head(args.drafter, loaded.target, loaded.tokenizer,
                        draft_vocabulary(samples, args.draft_vocab), **shape)
        head.config.trained["command"] = "quickdraft train " + " ".join(_given(args))
        steps = args.epochs * -(-int(len(samples) * (1 - options.heldout)) // args.batch_size)
        task = bar.add_task("training", total=steps)
        history = train(head, samples, options, output, args.resume,
                        lambda n, text: bar.update(task, advance=n, description=text))
    console.print(f"loss per epoch {[round(x, 3) for x in history.loss]}; held-out chain tau "
                  f"{[round(x, 2) for x in history.tau]} (first: untrained); head saved in {output}; "
                  f"total {time.perf_counter() - started:.0f} s")
    return 0


def as_features(samples: list, layers: list[int], target) -> list:
    """``samples`` with the features of ``layers``: an EAGLE run's (whose last feature layer is the top one)
    serve a Medusa head (layer -1: the top layer's state through the target's final norm)."""
    width = target.config.hidden_size
    if samples and samples[0].features.shape[1] == len(layers) * width:
        return samples
    if layers != [-1]:
        raise SystemExit("these samples hold other feature layers than this head reads; collect new ones")
    with torch.no_grad():
        for sample in samples:
            top = sample.features[:, -width:].to(target.dtype)
            sample.features = target.final_norm(top).to(torch.float16)
    return samples


def _given(args: argparse.Namespace) -> list[str]:
    parts = [f"--drafter {args.drafter}", f"-o {args.output}"]
    for name in ("model", "prompts", "samples", "num_prompts", "max_new_tokens", "epochs", "batch_size", "lr", "steps",
                 "draft_vocab", "seed", "dtype"):
        value = getattr(args, name, None)
        if value is not None:
            parts.append(f"--{name.replace('_', '-')} {value}")
    return parts


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)
