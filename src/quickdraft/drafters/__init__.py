"""Drafter registry: drafters register a name; the engine and the CLI look them up by it."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.errors import UnknownDrafterError

_REGISTRY: dict[str, type[Drafter]] = {}

#: Modules that define the built-in drafters; imported on first lookup so that importing quickdraft stays cheap.
_BUILTIN_MODULES = (
    "quickdraft.drafters.ngram",
    "quickdraft.drafters.draft_model",
    "quickdraft.drafters.suffix",
    "quickdraft.drafters.recycle",
    "quickdraft.drafters.lookahead",
    "quickdraft.drafters.auto",
    "quickdraft.drafters.layerskip",
    "quickdraft.drafters.xvocab",
)


def register(name: str) -> Callable[[type[Drafter]], type[Drafter]]:
    """Class decorator: make a drafter available as ``--drafter name``."""

    def decorate(cls: type[Drafter]) -> type[Drafter]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"drafter name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_drafters() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def drafter_class(name: str) -> type[Drafter]:
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownDrafterError(f"unknown drafter {name!r}; choose one of: {known} (or 'none' for plain decoding)")
    return _REGISTRY[name]


def create_drafter(name: str, setup: DrafterSetup) -> Drafter:
    return drafter_class(name).from_setup(setup)


__all__ = [
    "DraftContext",
    "Drafter",
    "DrafterSetup",
    "StepOutcome",
    "available_drafters",
    "create_drafter",
    "drafter_class",
    "register",
]
