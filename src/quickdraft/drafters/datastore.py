"""Suffix automata over token ids, and the static datastore file used by the ``suffix`` drafter.

The drafter itself is :mod:`quickdraft.drafters.suffix` (SAM-Decoding, Hu et al. 2024, "SAM Decoding:
Speculative Decoding via Suffix Automaton", arXiv:2411.10666). This module holds the data structures.

Terms:

- **suffix automaton** (SAM) of a text: the smallest automaton that accepts exactly the substrings of the text.
  Each **state** stands for a set of substrings that share the same set of end positions; ``length[s]`` is the
  length of the longest of them, and the **suffix link** ``link[s]`` is the state of the longest suffix of those
  strings that ends at more positions. It has at most ``2T - 1`` states and ``3T - 4`` transitions for a text of
  ``T`` tokens, and appending one token costs O(1) amortised (Blumer et al. 1985).
- **endpos** ``endpos[s]``: one position (index of the last token) where the strings of state ``s`` end.
- **anchor**: after each appended token, the state of the longest suffix of the text that also occurred
  *earlier*, and ``anchor_pos``, an earlier end position of it; the tokens after ``anchor_pos`` are the guess.
- **datastore**: a suffix automaton built once over a corpus and stored as flat int32 arrays (``.npz``); see
  :class:`StaticAutomaton` for its size bound.

Recency of ``endpos``: when the anchor is found, its ``endpos`` is read (an earlier occurrence) and then set to
the newest position, so a suffix that keeps recurring continues from its most recent occurrence. Only the
anchor is updated (not all of its suffix-link ancestors, which would cost O(T) per token), so a shorter suffix
may continue from an older occurrence; this keeps every update O(1) amortised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quickdraft.errors import InvalidRequestError

#: Token placed between the documents of a datastore; matches no real token, and continuations stop at it.
SEPARATOR = -1
#: Default cap on the corpus size of a datastore, in tokens (about 120 MB of arrays at the cap).
DEFAULT_MAX_TOKENS = 2_000_000
_FORMAT_VERSION = 1


class Automaton(Protocol):
    """What drafting needs from an automaton, dynamic or static."""

    def transition(self, state: int, token: int) -> int: ...
    def link_of(self, state: int) -> int: ...
    def length_of(self, state: int) -> int: ...
    def endpos_of(self, state: int) -> int: ...
    def edges(self, state: int) -> list[tuple[int, int]]: ...
    def continuation(self, pos: int, count: int) -> list[int]: ...


class SuffixAutomaton:
    """An online suffix automaton with per-state transition dicts (see the module docstring)."""

    def __init__(self) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.endpos: list[int] = [-1]
        self.tokens: list[int] = []
        self.last = 0
        self.anchor = 0
        self.anchor_pos = -1

    @property
    def num_states(self) -> int:
        return len(self.length)

    def extend_all(self, tokens: list[int]) -> None:
        for token in tokens:
            self.extend(token)

    def extend(self, token: int) -> None:
        """Append one token (Blumer et al.'s online construction), then update the anchor."""
        token = int(token)
        pos = len(self.tokens)
        self.tokens.append(token)
        cur = self._new_state(self.length[self.last] + 1, pos)
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        self.link[cur] = 0 if p == -1 else self._split(p, token)
        self.last = cur
        self._update_anchor(self.link[cur], pos)

    def _new_state(self, length: int, endpos: int) -> int:
        self.next.append({})
        self.link.append(-1)
        self.length.append(length)
        self.endpos.append(endpos)
        return len(self.length) - 1

    def _split(self, p: int, token: int) -> int:
        """The suffix link of the new state: ``q = next[p][token]``, or a clone of it of length ``len(p) + 1``."""
        q = self.next[p][token]
        if self.length[p] + 1 == self.length[q]:
            return q
        clone = self._new_state(self.length[p] + 1, self.endpos[q])
        self.next[clone] = dict(self.next[q])
        self.link[clone] = self.link[q]
        while p != -1 and self.next[p].get(token) == q:
            self.next[p][token] = clone
            p = self.link[p]
        self.link[q] = clone
        return clone

    def _update_anchor(self, state: int, pos: int) -> None:
        self.anchor = state
        self.anchor_pos = self.endpos[state] if state > 0 else -1
        if state > 0:
            self.endpos[state] = pos

    @property
    def anchor_length(self) -> int:
        """Length of the longest suffix of the text that occurred earlier (0: none)."""
        return self.length[self.anchor]

    # -- the Automaton protocol --
    def transition(self, state: int, token: int) -> int:
        return self.next[state].get(token, -1)

    def link_of(self, state: int) -> int:
        return self.link[state]

    def length_of(self, state: int) -> int:
        return self.length[state]

    def endpos_of(self, state: int) -> int:
        return self.endpos[state]

    def edges(self, state: int) -> list[tuple[int, int]]:
        return list(self.next[state].items())

    def continuation(self, pos: int, count: int) -> list[int]:
        """Up to ``count`` tokens after position ``pos``, stopping at a :data:`SEPARATOR`."""
        return _until_separator(self.tokens[pos + 1 : pos + 1 + count])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The automaton as flat int32 arrays (transitions in CSR form, sorted by token within a state)."""
        offsets = np.zeros(self.num_states + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(n) for n in self.next])
        edge_tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        edge_targets = np.empty(int(offsets[-1]), dtype=np.int32)
        for state, nxt in enumerate(self.next):
            items = sorted(nxt.items())
            lo = int(offsets[state])
            edge_tokens[lo : lo + len(items)] = [t for t, _ in items]
            edge_targets[lo : lo + len(items)] = [s for _, s in items]
        return {
            "tokens": np.asarray(self.tokens, dtype=np.int32),
            "link": np.asarray(self.link, dtype=np.int32),
            "length": np.asarray(self.length, dtype=np.int32),
            "endpos": np.asarray(self.endpos, dtype=np.int32),
            "offsets": offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64),
            "edge_tokens": edge_tokens,
            "edge_targets": edge_targets,
        }


class StaticAutomaton:
    """A read-only suffix automaton stored as flat arrays (the loaded datastore).

    Size bound: for a corpus of ``T`` tokens (documents joined by separators), at most ``2T`` states and
    ``3T`` transitions, stored as int32: ``tokens`` (4T bytes), ``link``/``length``/``endpos``/``offsets``
    (4 x 8T bytes), ``edge_tokens``/``edge_targets`` (2 x 12T bytes), i.e. at most about 60 bytes per corpus
    token on disk and in memory. :func:`build_datastore` caps ``T`` at ``max_tokens``.
    """

    _FIELDS = ("tokens", "link", "length", "endpos", "offsets", "edge_tokens", "edge_targets")

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        missing = [f for f in self._FIELDS if f not in arrays]
        if missing:
            raise InvalidRequestError(f"datastore is missing arrays {missing}; rebuild it with `quickdraft index`")
        self.tokens = np.asarray(arrays["tokens"])
        self.link = np.asarray(arrays["link"])
        self.length = np.asarray(arrays["length"])
        self.endpos = np.asarray(arrays["endpos"])
        self.offsets = np.asarray(arrays["offsets"])
        self.edge_tokens = np.asarray(arrays["edge_tokens"])
        self.edge_targets = np.asarray(arrays["edge_targets"])

    @property
    def num_states(self) -> int:
        return int(self.length.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def transition(self, state: int, token: int) -> int:
        lo, hi = int(self.offsets[state]), int(self.offsets[state + 1])
        if lo == hi:
            return -1
        i = lo + int(np.searchsorted(self.edge_tokens[lo:hi], token))
        return int(self.edge_targets[i]) if i < hi and int(self.edge_tokens[i]) == token else -1

    def link_of(self, state: int) -> int:
        return int(self.link[state])

    def length_of(self, state: int) -> int:
        return int(self.length[state])

    def endpos_of(self, state: int) -> int:
        return int(self.endpos[state])

    def edges(self, state: int) -> list[tuple[int, int]]:
        lo, hi = int(self.offsets[state]), int(self.offsets[state + 1])
        return list(zip(self.edge_tokens[lo:hi].tolist(), self.edge_targets[lo:hi].tolist()))

    def continuation(self, pos: int, count: int) -> list[int]:
        return _until_separator(self.tokens[pos + 1 : pos + 1 + count].tolist())


def advance(automaton: Automaton, state: int, length: int, token: int) -> tuple[int, int]:
    """Matching step: from the state/length of the longest suffix of the text read so far that occurs in the
    automaton's text, read ``token`` and return the new state/length (O(1) amortised)."""
    while state > 0 and automaton.transition(state, token) < 0:
        state = automaton.link_of(state)
        length = automaton.length_of(state)
    target = automaton.transition(state, token)
    if target < 0:
        return 0, 0
    return target, length + 1


def _until_separator(tokens: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token < 0:
            return tokens[:i]
    return tokens


# -- the datastore file --


def build_datastore(
    token_lists: list[list[int]], path: str | os.PathLike[str], max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """Build a suffix automaton over ``token_lists`` (documents, joined by :data:`SEPARATOR`) and save it as
    an ``.npz`` file at ``path`` (exactly that path). Returns counts: documents, tokens, states, transitions,
    bytes. Raises :class:`InvalidRequestError` for an empty corpus or one over ``max_tokens`` tokens.

    The file holds at most about 60 bytes per token (see :class:`StaticAutomaton`; about 38 MB for a million
    tokens of text). Building runs in pure Python: about 10 s and 0.7 GB of transient memory per million
    tokens, which is why ``max_tokens`` defaults to :data:`DEFAULT_MAX_TOKENS`."""
    if not Path(path).parent.is_dir():
        raise InvalidRequestError(f"cannot write datastore {str(path)!r}: its folder does not exist")
    docs = [[int(t) for t in doc] for doc in token_lists if len(doc) > 0]
    total = sum(len(d) for d in docs)
    if total == 0:
        raise InvalidRequestError("the corpus has no tokens; give at least one non-empty document")
    if total > max_tokens:
        raise InvalidRequestError(
            f"the corpus has {total} tokens, over the datastore limit of {max_tokens}; index fewer files"
        )
    sam = SuffixAutomaton()
    for i, doc in enumerate(docs):
        if i:
            sam.extend(SEPARATOR)
        sam.extend_all(doc)
    arrays = sam.to_arrays()
    with open(path, "wb") as f:
        np.savez(f, version=np.asarray(_FORMAT_VERSION), **arrays)
    return {
        "path": str(path),
        "documents": len(docs),
        "tokens": total,
        "states": sam.num_states,
        "transitions": int(arrays["edge_tokens"].shape[0]),
        "bytes": os.path.getsize(path),
    }


def load_datastore(path: str | os.PathLike[str]) -> StaticAutomaton:
    """Load a datastore written by :func:`build_datastore` (no pickle: plain arrays only)."""
    if not Path(path).is_file():
        raise InvalidRequestError(f"datastore file {str(path)!r} does not exist; build one with `quickdraft index`")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"{str(path)!r} is not a quickdraft datastore (.npz): {exc}") from exc
    if int(arrays.get("version", -1)) != _FORMAT_VERSION:
        raise InvalidRequestError(f"{str(path)!r} has an unknown datastore version; rebuild it with `quickdraft index`")
    return StaticAutomaton(arrays)


def index_corpus(
    files: list[str], tokenizer: Any, out: str, max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """Read UTF-8 text files, tokenize each with ``tokenizer.encode`` and save a datastore at ``out``.

    Raises :class:`InvalidRequestError` for no files, a missing file, an empty file, or a file that is not
    UTF-8 text. Returns the counts of :func:`build_datastore` plus ``files``."""
    if not files:
        raise InvalidRequestError("no corpus files given; pass one or more UTF-8 text files to index")
    docs = [_encode(tokenizer, _read_text(f), f) for f in files]
    stats = build_datastore(docs, out, max_tokens=max_tokens)
    stats["files"] = len(files)
    return stats


def _read_text(file: str) -> str:
    path = Path(file)
    if not path.is_file():
        raise InvalidRequestError(f"corpus file {file!r} does not exist (or is not a regular file)")
    data = path.read_bytes()
    if not data.strip():
        raise InvalidRequestError(f"corpus file {file!r} is empty; remove it or give a file with text")
    if b"\x00" in data:
        raise InvalidRequestError(f"corpus file {file!r} looks binary (it contains NUL bytes); give UTF-8 text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"corpus file {file!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _encode(tokenizer: Any, text: str, file: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    ids = [int(t) for t in ids]
    if not ids:
        raise InvalidRequestError(f"corpus file {file!r} produced no tokens; give a file with text")
    return ids
