"""quickdraft's token-only drafters as vLLM proposers (vLLM's ``custom_class`` speculative method).

vLLM (0.32) builds the class named in ``speculative_config["model"]`` with its ``VllmConfig`` and calls
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)`` after every step, with
one entry per batch row; it verifies the returned chains itself (chains, not trees). Classes:

- :class:`Ngram`: quickdraft's ``ngram`` (prompt lookup);
- :class:`Suffix`: ``suffix`` (a suffix automaton over the request, and an optional datastore);
- :class:`Auto`: ``auto`` over token-only sources (default ``suffix``: the part of ``auto``'s default
  sources that needs nothing from the target; ``recycle`` needs the target's logits, which vLLM does not
  give a proposer).

Usage::

    LLM(model=DIR, speculative_config={"method": "custom_class",
                                       "model": "quickdraft.integrations.vllm.Suffix",
                                       "num_speculative_tokens": 8})

Drafter options (what ``--drafter-option`` sets in quickdraft) come from the environment variable
``QUICKDRAFT_VLLM_OPTIONS``, a JSON object such as ``{"datastore": "store.npz", "max_depth": 8}``: vLLM's
speculative config accepts no extra keys. An unknown option or a bad value stops vLLM at start-up with a
message naming the valid options.

This module does not import vLLM: it only reads attributes of the config vLLM passes in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from quickdraft.drafters import Drafter, DrafterSetup, check_drafter_options, create_drafter
from quickdraft.errors import InvalidRequestError, QuickdraftError
from quickdraft.integrations.rows import RowDrafters

OPTIONS_ENV = "QUICKDRAFT_VLLM_OPTIONS"
#: Drafters that need only the token ids, so they work inside vLLM (by class name in this module).
PROPOSERS = {"ngram": "Ngram", "suffix": "Suffix", "auto": "Auto"}
#: ``auto``'s sources inside vLLM when none are given, and those it may have.
AUTO_SOURCES = "suffix"
TOKEN_ONLY = ("ngram", "suffix")


class ProposerConfigError(QuickdraftError):
    """A quickdraft proposer cannot start with the options it was given."""


def read_options(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The drafter options in ``QUICKDRAFT_VLLM_OPTIONS`` (empty when unset)."""
    text = (environ if environ is not None else os.environ).get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProposerConfigError(f"{OPTIONS_ENV} must be a JSON object of drafter options, e.g. "
                                  f'{{"max_ngram": 4}}; could not parse {text!r}: {error}') from None
    if not isinstance(options, dict):
        raise ProposerConfigError(f"{OPTIONS_ENV} must be a JSON object of drafter options, got {text!r}")
    return options


def drafter_factory(name: str, options: dict[str, Any]) -> Callable[[], Drafter]:
    """A function that builds drafter ``name`` with ``options``, after building one to check them (so a bad
    option fails here, at start-up, with the drafter's own message)."""
    options = dict(options)
    if name == "auto":
        options.setdefault("sources", AUTO_SOURCES)
        check_sources(str(options["sources"]))
    try:
        check_drafter_options(name, options)
        build_drafter(name, options).end()
    except InvalidRequestError as error:
        raise ProposerConfigError(f"quickdraft {name} proposer: {error} (set in {OPTIONS_ENV})") from None
    return lambda: build_drafter(name, options)


def build_drafter(name: str, options: dict[str, Any]) -> Drafter:
    """Drafter ``name`` without a target model (token-only drafters need none). ``auto`` is assembled from
    its sources here: its own set-up would probe the target for a shipped head."""
    if name != "auto":
        return create_drafter(name, DrafterSetup(target=None, tokenizer=None, options=options))  # type: ignore[arg-type]
    from quickdraft.drafters.auto import AutoDrafter

    rest = dict(options)
    names = [n.strip() for n in str(rest.pop("sources")).split(",") if n.strip()]
    datastore = rest.pop("datastore", None)
    sources = [build_drafter(n, {"datastore": datastore} if n == "suffix" and datastore else {}) for n in names]
    try:
        return AutoDrafter(sources, **rest)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"invalid option for the auto drafter ({error}); its options inside vLLM are: "
                                  f"datastore, smoothing, sources") from None


def check_sources(sources: str) -> None:
    """Refuse ``auto`` sources that need more than token ids."""
    names = [n.strip() for n in sources.split(",") if n.strip()]
    bad = [n for n in names if n not in TOKEN_ONLY]
    if bad or not names:
        raise ProposerConfigError(
            f"quickdraft auto proposer: sources {sources!r} are not all token-only; inside vLLM auto can use "
            f"ngram and suffix (drafters needing the target's logits or hidden states cannot run there)")


def speculative_tokens(vllm_config: Any) -> int:
    """``num_speculative_tokens`` of vLLM's speculative config: the longest chain a proposer may return."""
    spec = getattr(vllm_config, "speculative_config", None)
    k = getattr(spec, "num_speculative_tokens", None)
    if not isinstance(k, int) or k < 1:
        raise ProposerConfigError("a quickdraft proposer needs num_speculative_tokens >= 1 in the speculative config")
    return k


class QuickdraftProposer:
    """A vLLM proposer running one of quickdraft's token-only drafters per batch row (see the module
    docstring). Subclasses set ``drafter``."""

    drafter: ClassVar[str] = "?"

    def __init__(self, vllm_config: Any, options: dict[str, Any] | None = None) -> None:
        self.k = speculative_tokens(vllm_config)
        self.max_model_len = int(getattr(getattr(vllm_config, "model_config", None), "max_model_len", 1 << 30))
        make = drafter_factory(self.drafter, read_options() if options is None else options)
        self.rows = RowDrafters(make, self.k)

    def propose(
        self,
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
        **_: Any,
    ) -> list[list[int]]:
        """One chain per batch row. ``sampled_token_ids[i]``: the tokens row ``i`` committed this step (empty:
        no draft, e.g. a prompt still being prefilled in chunks); ``num_tokens_no_spec[i]``: row ``i``'s
        token count; ``token_ids_cpu``: [max rows, max model length] token ids, row ``i`` valid up to that."""
        rows: list[np.ndarray | None] = []  # row i: a view of token_ids_cpu[i, :n], not a copy
        limits: list[int] = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            rows.append(token_ids_cpu[i, :n] if len(sampled) and n < self.max_model_len else None)
            limits.append(self.max_model_len - n)
        return self.rows.propose(rows, limits)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM asks proposers to load their model; these have none."""


class Ngram(QuickdraftProposer):
    """quickdraft's ``ngram`` drafter (options ``max_ngram``, ``min_ngram``)."""

    drafter = "ngram"


class Suffix(QuickdraftProposer):
    """quickdraft's ``suffix`` drafter (options ``max_depth``, ``min_match``, ``datastore``, ...)."""

    drafter = "suffix"


class Auto(QuickdraftProposer):
    """quickdraft's ``auto`` drafter over token-only sources (options ``sources``, ``smoothing``,
    ``datastore``)."""

    drafter = "auto"


def proposer_path(name: str) -> str:
    """The ``speculative_config["model"]`` value for quickdraft drafter ``name``."""
    if name not in PROPOSERS:
        raise InvalidRequestError(f"drafter {name!r} cannot run inside vLLM; choose one of: "
                                  f"{', '.join(PROPOSERS)} (token-only drafters)")
    return f"{__name__}.{PROPOSERS[name]}"
