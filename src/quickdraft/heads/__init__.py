"""Trained draft heads (EAGLE-style and Medusa) and the config that ties a head to its target."""

from quickdraft.heads.build import build_head, load_head, new_head
from quickdraft.heads.config import HeadConfig, HeadMismatchError, TargetFacts, save_head, shipped_head

__all__ = ["HeadConfig", "HeadMismatchError", "TargetFacts", "build_head", "load_head", "new_head", "save_head",
           "shipped_head"]
