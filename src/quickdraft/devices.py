"""Small device helpers shared by the engine, the loaders, the budget policies and the benchmark."""

from __future__ import annotations

import functools
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


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (``model name``, ``flags``, ...); empty where there is
    none (macOS, Windows). Read once per process (callers must not change the dict)."""
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


def leave_cpu_threads_to_a_worker(threads: int | None = None) -> int:
    """Run the calling (main) thread's torch ops on one CPU thread from now on, and return how many threads
    the worker thread that decodes should take (``threads``, else torch's current count).

    Call it before a server loads its model on the main thread and decodes on a worker thread. Every Python
    thread that runs torch ops owns its own OpenMP team, and the team stays alive; once a process has more
    OpenMP threads than CPUs, libgomp's threads stop spin-waiting between parallel regions and every op pays
    to wake them. On a 2-core machine a 2-thread team left on the main thread by loading made each op on the
    decoding thread 2 to 4 times slower (results/served-vs-engine-amx.md); with the main thread on one thread the
    worker decodes as fast as the main thread would."""
    wanted = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return wanted
