"""Training a head on self-distilled samples (:mod:`quickdraft.train.data`): AdamW, checkpoints, ``--resume``.

Terms:

- **label** of an EAGLE pair ``i`` (:mod:`quickdraft.heads.eagle`): the target's argmax after token ``i + 1``,
  i.e. its choice of ``t_{i+2}``; of Medusa head ``k`` at token ``i`` (whose argmax is the root ``t_{i+1}``):
  the target's argmax after token ``i + k``.
  Labels outside the draft vocabulary are ignored.
- **loss**: cross-entropy over the draft vocabulary; for EAGLE the sum over the training-time-test steps, step
  ``s`` weighted ``0.8 ** (s - 1)``; for Medusa the sum over heads, head ``k`` weighted ``0.8 ** (k - 1)``.
- **held-out tau**: the committed tokens per target forward a greedy *chain* of the head would reach on the
  held-out samples: ``1 +`` the mean number of leading draft tokens equal to the labels, over every start
  position, drafting up to ``chain`` tokens. (A tree accepts at least as many.) It is measured after each epoch.
- **draft vocabulary**: the ``draft_vocab_size`` most frequent labels of the training samples.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quickdraft.heads.config import save_head
from quickdraft.heads.eagle import EagleHead
from quickdraft.heads.medusa import MedusaHead
from quickdraft.train.data import Sample

STEP_WEIGHT = 0.8
STATE_FILE = "train_state.pt"


@dataclass
class TrainOptions:
    """What ``quickdraft train`` varies (see ``quickdraft train --help``)."""

    kind: str = "eagle"
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    steps: int = 3  # eagle: training-time-test steps
    medusa_heads: int = 4
    draft_vocab_size: int = 8192
    heldout: float = 0.1
    chain: int = 6
    seed: int = 0


@dataclass
class History:
    """Per-epoch mean training loss and held-out tau; the first entry of ``tau`` is before training."""

    loss: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    seconds: float = 0.0


def draft_vocabulary(samples: list[Sample], size: int) -> list[int]:
    """The ``size`` most frequent labels (ties: smaller id first), in ascending id order."""
    counts = Counter(token for sample in samples for token in sample.labels.tolist())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]
    return sorted(token for token, _ in ranked)


def split(samples: list[Sample], heldout: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out samples (at least one of each where there are two)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    count = min(len(samples) - 1, max(1, round(len(samples) * heldout))) if len(samples) > 1 else 0
    return [samples[i] for i in order[count:]], [samples[i] for i in order[:count]]


def batches(samples: list[Sample], size: int, seed: int | None) -> list[list[Sample]]:
    order = list(range(len(samples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [[samples[i] for i in order[first : first + size]] for first in range(0, len(order), size)]


def padded(batch: list[Sample], vocab_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``[B, T, F*H]``, tokens ``[B, T]`` and labels ``[B, T]`` as draft-vocabulary indices (-100:
    ignored), right-padded; row ``i`` of a sample is token ``i``."""
    width = max(len(s.tokens) for s in batch)
    features = torch.zeros(len(batch), width, batch[0].features.shape[1])
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, sample in enumerate(batch):
        length = len(sample.tokens)
        features[row, :length] = sample.features.float()
        tokens[row, :length] = sample.tokens
        labels[row, :length] = vocab_index[sample.labels]
    return features, tokens, labels


def eagle_outputs(head: EagleHead, batch: list[Sample], vocab_index: torch.Tensor,
                  steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each training-time-test step's scores ``[B, T-1, Vd]`` over pairs ``i`` and their labels ``[B, T-1]``
    (step ``s`` rows ``i < s - 1`` masked to -100 in the labels it is scored with: see :func:`eagle_loss`)."""
    features, tokens, labels = padded(batch, vocab_index)
    scores = head.train_forward(features[:, :-1], tokens[:, 1:], steps)
    return scores, labels[:, 1:]


def eagle_loss(scores: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    total = scores[0].new_zeros(())
    for s, step_scores in enumerate(scores, start=1):
        step_labels = labels.clone()
        step_labels[:, : s - 1] = -100
        if (step_labels >= 0).any():
            total = total + STEP_WEIGHT ** (s - 1) * F.cross_entropy(step_scores.flatten(0, 1), step_labels.flatten(),
                                                                       ignore_index=-100)
    return total


def medusa_outputs(head: MedusaHead, batch: list[Sample], vocab_index: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Scores ``[B, T, K, Vd]`` and per head ``k = 1 .. K`` its labels ``[B, T]``: at token ``i``, the argmax
    after token ``i + k`` (the token ``k`` places after the root ``t_{i+1}``)."""
    features, _, labels = padded(batch, vocab_index)
    scores = head(features)
    per_head = []
    for k in range(1, head.num_heads + 1):
        shifted = torch.full_like(labels, -100)
        shifted[:, : labels.shape[1] - k] = labels[:, k:]
        per_head.append(shifted)
    return scores, per_head


def medusa_loss(scores: torch.Tensor, per_head: list[torch.Tensor]) -> torch.Tensor:
    total = scores.new_zeros(())
    for k, labels in enumerate(per_head):
        if (labels >= 0).any():
            total = total + STEP_WEIGHT**k * F.cross_entropy(scores[:, :, k].flatten(0, 1), labels.flatten(),
                                                              ignore_index=-100)
    return total


def batch_loss(head: Any, batch: list[Sample], vocab_index: torch.Tensor, options: TrainOptions) -> torch.Tensor:
    if isinstance(head, EagleHead):
        return eagle_loss(*eagle_outputs(head, batch, vocab_index, options.steps))
    return medusa_loss(*medusa_outputs(head, batch, vocab_index))


def chain_hits(head: Any, batch: list[Sample], vocab_index: torch.Tensor, chain: int) -> torch.Tensor:
    """``hits [depth, B, T']``: whether the head's greedy draft at depth ``d`` from start ``j`` equals the label
    when every shallower draft was right (EAGLE: step ``d`` row ``j + d - 1``; Medusa: head ``d`` at ``j``)."""
    if isinstance(head, EagleHead):
        scores, labels = eagle_outputs(head, batch, vocab_index, chain)
        width = labels.shape[1]
        rows = []
        for d, step in enumerate(scores):
            right = (step.argmax(-1) == labels) & (labels >= 0)
            shifted = torch.zeros_like(right)
            shifted[:, : width - d] = right[:, d:]
            rows.append(shifted)
        return torch.stack(rows)
    scores, per_head = medusa_outputs(head, batch, vocab_index)
    return torch.stack([(scores[:, :, k].argmax(-1) == labels) & (labels >= 0) for k, labels in enumerate(per_head)])


@torch.no_grad()
def heldout_tau(head: Any, samples: list[Sample], vocab_index: torch.Tensor, options: TrainOptions) -> float:
    """The held-out tau of a greedy chain (module docstring), over the answers' start positions."""
    head.eval()
    accepted, starts = 0.0, 0
    for batch in batches(samples, options.batch_size, None):
        hits = chain_hits(head, batch, vocab_index, options.chain)  # [D, B, T']
        run = hits.long().cumprod(0).sum(0)  # leading right drafts per start
        for row, sample in enumerate(batch):
            first, last = max(sample.prompt_len - 1, 0), len(sample.tokens) - 2
            if last >= first:
                accepted += float(run[row, first : last + 1].sum())
                starts += last + 1 - first
    head.train()
    return 1.0 + accepted / max(starts, 1)


def medusa_accuracy(head: MedusaHead, samples: list[Sample], vocab_index: torch.Tensor,
                    top_k: int = 8) -> list[list[float]]:
    """``accuracy[k][r]``: how often head ``k``'s rank-``r`` token was the label on ``samples``."""
    counts = torch.zeros(head.num_heads, top_k)
    total = torch.zeros(head.num_heads)
    with torch.no_grad():
        for batch in batches(samples, 8, None):
            scores, per_head = medusa_outputs(head, batch, vocab_index)
            ranked = scores.topk(min(top_k, scores.shape[-1]), -1).indices  # [B, T, K, r]
            for k, labels in enumerate(per_head):
                valid = labels >= 0
                hits = (ranked[:, :, k] == labels.unsqueeze(-1)) & valid.unsqueeze(-1)
                counts[k, : hits.shape[-1]] += hits.sum((0, 1)).float()
                total[k] += valid.sum()
    return (counts / total.clamp_min(1).unsqueeze(1)).tolist()


def train(head: Any, samples: list[Sample], options: TrainOptions, output: Path | None = None,
          resume: bool = False, progress: Any = None) -> History:
    """Train ``head`` (built over the draft vocabulary) on ``samples``; after each epoch measure the held-out
    tau and, given ``output``, save the head and a checkpoint there. ``resume``: continue from that checkpoint.
    ``progress(advance, description)`` is called after every batch."""
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    training, heldout = split(samples, options.heldout, options.seed)
    vocab_index = _vocab_index(head)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=options.lr,
                                  weight_decay=0.0)
    total_steps = max(1, options.epochs * math.ceil(len(training) / options.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    history, first_epoch = History(), 0
    if resume and output is not None and (output / STATE_FILE).is_file():
        first_epoch, history = _restore(output / STATE_FILE, head, optimizer, schedule)
    if not history.tau:
        history.tau.append(heldout_tau(head, heldout or training, vocab_index, options))
    head.train()
    for epoch in range(first_epoch, options.epochs):
        losses = []
        for batch in batches(training, options.batch_size, options.seed + epoch):
            loss = batch_loss(head, batch, vocab_index, options)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress(1, f"epoch {epoch + 1}/{options.epochs} loss {sum(losses) / len(losses):.3f}")
        history.loss.append(sum(losses) / max(len(losses), 1))
        history.tau.append(heldout_tau(head, heldout or training, vocab_index, options))
        history.seconds += time.perf_counter() - started
        started = time.perf_counter()
        if output is not None:
            finish(head, heldout or training, vocab_index, options, history, output)
            torch.save({"epoch": epoch + 1, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "history": asdict(history)}, output / STATE_FILE)
    head.eval()
    return history


def finish(head: Any, heldout: list[Sample], vocab_index: torch.Tensor, options: TrainOptions, history: History,
           output: Path) -> None:
    """Record what training measured in the head's config and save the head into ``output``."""
    config = head.config
    if isinstance(head, MedusaHead):
        config.accuracy = medusa_accuracy(head, heldout, vocab_index)
    config.trained = {**config.trained, "epochs": len(history.loss), "loss": history.loss, "heldout_tau": history.tau,
                      "seconds": round(history.seconds, 1), "options": asdict(options)}
    save_head(output, config, head)


def _vocab_index(head: Any) -> torch.Tensor:
    """Full id -> draft-vocabulary index (-100 outside it)."""
    index = torch.full((head.config.vocab_size,), -100, dtype=torch.long)
    index[head.draft_ids] = torch.arange(len(head.draft_ids))
    return index


def _restore(path: Path, head: Any, optimizer: Any, schedule: Any) -> tuple[int, History]:
    state = torch.load(path, weights_only=False)
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["epoch"], History(**state["history"])
