"""Small device helpers shared by the engine, the loaders, the budget policies and the benchmark."""

from __future__ import annotations

from pathlib import Path

import torch


def dtype_name(dtype: torch.dtype | str) -> str:
    """A torch dtype's short name, as the ``--dtype`` flags and the cache keys write it: ``torch.bfloat16`` ->
    ``"bfloat16"`` (a name passes through unchanged)."""
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device | str | None) -> None:
    """Wait until the work queued on ``device`` is done, so that a wall-clock time covers it: on a CUDA device
    (when CUDA is available); nothing on any other device or for None."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (``model name``, ``flags``, ...); empty where there is
    none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def cpu_name() -> str:
    """The CPU's model name, or "unknown"."""
    return cpuinfo().get("model name") or "unknown"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    flags = cpuinfo().get("flags", "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags
