"""A model as vLLM loads it: a folder with ``config.json``, float32 safetensors weights and the tokenizer.

quickdraft's embedded model is a 4-bit GGUF file, which vLLM's CPU build does not serve; this converts it
once (through quickdraft's own loading) and keeps the folder in quickdraft's cache (kind ``vllm-model``,
keyed like every converted model by the file's fingerprint and the converting versions). A model folder is
used as it is.

``python -m quickdraft.integrations.model_dir [MODEL]`` prints the folder (converting first if needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from quickdraft import cache
from quickdraft.errors import QuickdraftError
from quickdraft.models.loading import conversion_key, load_model, resolve_model_path

KIND = "vllm-model"


def vllm_model_dir(model: str | None = None) -> Path:
    """The folder vLLM should load for ``model`` (None or ``default``: the embedded model)."""
    path = resolve_model_path(model)
    if path.is_dir():
        return path
    key = conversion_key(path, torch.float32)
    return cache.cached(KIND, key, lambda folder: _write(str(path), folder), lambda folder: folder,
                        label=f"{path.name} float32 for vLLM")


def _write(model: str, folder: Path) -> None:
    """Convert ``model`` (a GGUF file) into ``folder``: config, float32 weights, tokenizer."""
    loaded = load_model(model, dtype="float32", device="cpu", native=False)
    loaded.hf_model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        print(vllm_model_dir(args[0] if args else None))
    except QuickdraftError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
