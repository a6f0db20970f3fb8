"""Small device helpers shared by the engine, the loaders, the budget policies and the benchmark."""

from __future__ import annotations

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
