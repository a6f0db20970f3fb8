"""A cache on disk of what is slow to make and cheap to keep: converted models, measured cost curves.

Terms:

- **cache root**: ``$QUICKDRAFT_CACHE`` if set, else ``$XDG_CACHE_HOME/quickdraft``, else
  ``~/.cache/quickdraft``.
- **kind**: what an entry holds (``"model"``, ``"cost-curve"``, ...); each kind is a folder of the root.
- **key**: a flat mapping of names to strings that says everything an entry's content depends on (the source
  file's :func:`fingerprint`, quickdraft's version, the dtype, ...). The entry's folder is named by the
  SHA-256 of the key, so a change in any part makes a new entry instead of reusing a stale one.
- **entry**: the folder ``ROOT/KIND/DIGEST/``, holding its files and ``entry.json`` (the key, a label for
  people, the time it was made). An entry is **complete** when its ``entry.json`` exists.

An entry is written into a temporary folder beside it and renamed into place in one step, so a reader never
sees half an entry, and two processes that build the same entry at once both succeed (the second rename
loses and its copy is dropped). An entry that cannot be read (a crash left it, a disk error damaged it) is
removed and built again by :func:`cached`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
#: How many bytes at each end of a file :func:`fingerprint` hashes.
SAMPLE_BYTES = 1 << 20
T = TypeVar("T")

Key = Mapping[str, str]


@dataclass(frozen=True)
class Entry:
    """A complete entry as :func:`entries` lists it: ``size`` in bytes of all its files."""

    kind: str
    path: Path
    key: dict[str, str]
    label: str
    created: float
    size: int


def cache_root() -> Path:
    """The cache root (see the module docstring); not created here."""
    if os.environ.get("QUICKDRAFT_CACHE"):
        return Path(os.environ["QUICKDRAFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "quickdraft"


def digest(key: Key) -> str:
    """The name of ``key``'s entry: SHA-256 of its sorted JSON, 32 hex digits."""
    text = json.dumps(dict(key), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_path(kind: str, key: Key) -> Path:
    """Where the entry of ``kind`` for ``key`` lives (it may not exist)."""
    return cache_root() / kind / digest(key)


def lookup(kind: str, key: Key) -> Path | None:
    """The complete entry for ``key``, or None. An incomplete folder at its place is removed."""
    path = entry_path(kind, key)
    if (path / ENTRY_FILE).is_file():
        return path
    if path.exists():
        discard(path)
    return None


def store(kind: str, key: Key, write: Callable[[Path], None], label: str = "") -> Path:
    """Build the entry for ``key``: ``write(folder)`` fills a fresh temporary folder, which is then renamed
    into place. If another process put the entry there first, its copy is kept and this one dropped."""
    final = entry_path(kind, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(staging)
        record = {"key": dict(key), "label": label, "created": time.time()}
        (staging / ENTRY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / ENTRY_FILE).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def cached(kind: str, key: Key, write: Callable[[Path], None], read: Callable[[Path], T], label: str = "") -> T:
    """``read`` of the entry for ``key``, built first with ``write`` where it is missing. An entry that
    ``read`` fails on is removed and built once more; a failure then is raised."""
    found = read_entry(kind, key, read)
    return found if found is not None else read(store(kind, key, write, label))


def read_entry(kind: str, key: Key, read: Callable[[Path], T]) -> T | None:
    """``read`` of the entry for ``key``, or None where there is none or ``read`` fails on it (the entry is
    then removed, to be built again)."""
    path = lookup(kind, key)
    if path is None:
        return None
    try:
        return read(path)
    except Exception as error:  # any failure to read an entry means: rebuild it
        log.warning("cache entry %s could not be read (%s); building it again", path, error)
        discard(path)
        return None


def source_key(path: Path) -> dict[str, str]:
    """Key parts of what is derived from the model file or folder at ``path``: its :func:`fingerprint` and the
    versions of quickdraft and transformers, which convert and read it."""
    from importlib.metadata import version

    import transformers

    return {**fingerprint(path), "quickdraft": version("quickdraft"), "transformers": transformers.__version__}


def discard(path: Path) -> None:
    """Remove an entry folder: first renamed aside (at once invisible to readers), then deleted."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def entries() -> list[Entry]:
    """Every complete entry under the cache root, oldest first."""
    found = []
    root = cache_root()
    for record_file in root.glob(f"*/*/{ENTRY_FILE}"):
        folder = record_file.parent
        if folder.name.startswith("."):
            continue
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        found.append(Entry(folder.parent.name, folder, record.get("key", {}), record.get("label", ""),
                           float(record.get("created", 0.0)), folder_size(folder)))
    return sorted(found, key=lambda entry: entry.created)


def clear() -> tuple[int, int]:
    """Remove everything under the cache root; returns (entries removed, bytes freed)."""
    listed = entries()
    root = cache_root()
    freed = folder_size(root) if root.exists() else 0
    for kind_folder in (root.iterdir() if root.exists() else []):
        if kind_folder.is_dir():
            for folder in kind_folder.iterdir():
                discard(folder)
    return len(listed), freed


def folder_size(folder: Path) -> int:
    """Bytes of all files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def fingerprint(path: Path) -> dict[str, str]:
    """Key parts that change when the file or folder at ``path`` changes: for each file (the file itself, or
    each file directly in the folder) its name, size, modification time and a SHA-256 of its size and its first
    and last :data:`SAMPLE_BYTES` bytes. Cheap on a large file, and a rewrite shows in all three."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    sha = hashlib.sha256()
    for file in files:
        stat = file.stat()
        sha.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        sha.update(_sample_hash(file, stat.st_size))
    return {"source": str(path), "source_fingerprint": sha.hexdigest()[:32]}


def machine_key(device_type: str = "cpu") -> dict[str, str]:
    """Key parts for a measurement that depends on the hardware and software: the CPU's model name and a
    hash of its feature flags (from /proc/cpuinfo), torch's thread count and version, and for CUDA the GPU."""
    import torch

    from quickdraft.devices import cpuinfo

    cpu = cpuinfo()
    key = {"cpu": cpu.get("model name", "unknown"),
           "cpu_flags": hashlib.sha256(cpu.get("flags", "").encode()).hexdigest()[:16],
           "threads": str(torch.get_num_threads()), "torch": torch.__version__, "device": device_type}
    if device_type == "cuda":
        key["gpu"] = torch.cuda.get_device_name()
    return key


def _sample_hash(file: Path, size: int) -> bytes:
    """SHA-256 of the first and last :data:`SAMPLE_BYTES` bytes of ``file`` (the whole file if smaller)."""
    sha = hashlib.sha256()
    with file.open("rb") as handle:
        sha.update(handle.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            handle.seek(size - SAMPLE_BYTES)
        sha.update(handle.read(SAMPLE_BYTES))
    return sha.digest()
