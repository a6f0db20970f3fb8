"""Heads built from a config: untrained (:func:`new_head`, :func:`build_head`) or loaded from a folder
(:func:`load_head`), checked against the target they are for. Apart from :mod:`quickdraft.heads.config` so that
the head modules, which read the config, are not imported back by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quickdraft.errors import InvalidRequestError
from quickdraft.heads.config import (
    HeadConfig,
    TargetFacts,
    check_fits,
    default_feature_layers,
    read_config,
    read_weights,
)
from quickdraft.heads.eagle import EagleHead
from quickdraft.heads.medusa import MedusaHead
from quickdraft.models.base import TargetModel


def load_head(directory: str | Path, target: TargetModel, tokenizer: Any, kind: str | None = None) -> Any:
    """The head in ``directory``, built and bound to ``target`` (:class:`~quickdraft.heads.eagle.EagleHead` or
    :class:`~quickdraft.heads.medusa.MedusaHead`). Raises :class:`HeadMismatchError` naming what differs where
    the head was trained for another model, and :class:`InvalidRequestError` for another ``kind``."""
    config = read_config(directory)
    if kind is not None and config.kind != kind:
        raise InvalidRequestError(f"{directory} holds a {config.kind} head, not a {kind} head")
    check_fits(config, TargetFacts.of(target, tokenizer), directory)
    module = build_head(config)
    module.load_state_dict(read_weights(directory))
    return module.bind(target).eval()


def build_head(config: HeadConfig) -> Any:
    """An untrained (randomly initialised) head of ``config``'s kind and shape."""
    return EagleHead(config) if config.kind == "eagle" else MedusaHead(config)


def new_head(kind: str, target: TargetModel, tokenizer: Any, draft_vocab: list[int], **shape: Any) -> Any:
    """An untrained head of ``kind`` for ``target`` over ``draft_vocab``, bound to the target."""
    facts = TargetFacts.of(target, tokenizer)
    config = HeadConfig.for_target(kind, facts, default_feature_layers(kind, facts.num_layers), draft_vocab, **shape)
    head = build_head(config).bind(target)
    final_norm = getattr(target, "final_norm", None)
    if kind == "eagle" and final_norm is not None:  # the target's own output scale, as its final norm gives it
        with torch.no_grad():
            head.norm.weight.copy_(final_norm.weight.float())
    return head
