"""Drafter registry: drafters register a name; the engine and the CLI look them up by it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.errors import InvalidRequestError, QuickdraftError, UnknownDrafterError

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
    "quickdraft.drafters.eagle",
    "quickdraft.drafters.medusa",
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


@contextmanager
def restoring_registry() -> Iterator[None]:
    """Drafters registered inside the block are forgotten when it ends (tests register throwaway drafters);
    the built-in drafters stay."""
    _load_builtins()
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


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
    """Build drafter ``name`` with the user's options in ``setup``.

    Raises :class:`InvalidRequestError` for an option the drafter does not know (naming those it knows) and
    for a value its constructor rejects (a number that does not parse, a number where a list belongs),
    instead of letting a ``TypeError`` or ``ValueError`` out."""
    cls = check_drafter_options(name, setup.options)
    try:
        return cls.from_setup(setup)
    except QuickdraftError:
        raise
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(
            f"invalid option value for the {name} drafter ({error}); options given: {setup.options}"
        ) from error


def check_drafter_options(name: str, options: Mapping[str, Any]) -> type[Drafter]:
    """The class of drafter ``name``, after checking that it knows every option name in ``options`` (cheap:
    nothing is built, so callers check before loading a model)."""
    cls = drafter_class(name)
    accepted = cls.accepted_options()
    unknown = sorted(set(options) - accepted)
    if unknown:
        listed = ", ".join(sorted(accepted)) or "(none)"
        raise InvalidRequestError(f"the {name} drafter has no option {', '.join(map(repr, unknown))}; "
                                  f"its options are: {listed}")
    return cls


__all__ = [
    "DraftContext",
    "Drafter",
    "DrafterSetup",
    "StepOutcome",
    "available_drafters",
    "check_drafter_options",
    "create_drafter",
    "drafter_class",
    "register",
    "restoring_registry",
]
