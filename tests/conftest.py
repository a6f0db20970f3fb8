"""Shared fixtures: tiny random models of every supported architecture, and a minimal tokenizer."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from quickdraft.drafters import register, restoring_registry
from quickdraft.engine import Engine
from quickdraft.models.hf import HFCausalLM
from quickdraft.models.loading import LoadedModel
from quickdraft.models.native import NativeCausalLM

TINY_VOCAB = 96

TINY = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)

ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),
}


class CharTokenizer:
    """Token ``i`` is the character ``chr(65 + i)``; no chat template; EOS is the last id."""

    chat_template = None

    def __init__(self, vocab_size: int = TINY_VOCAB) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """Token ids of ``text`` (there are no special tokens to add)."""
        return {"input_ids": [min(max(ord(c) - 65, 0), self.vocab_size - 2) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def tiny_hf_model(architecture: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ARCHITECTURES[architecture]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    # Sharper logits than the default init make greedy continuations repetitive, so drafts get accepted.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def perturbed_copy(hf_model: torch.nn.Module, scale: float = 0.003, seed: int = 1) -> torch.nn.Module:
    """A copy of ``hf_model`` with gaussian noise on every weight: a draft model that mostly agrees."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    draft = copy.deepcopy(hf_model)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return draft


def tiny_loaded(architecture: str = "llama", seed: int = 0, native: bool = True) -> LoadedModel:
    hf_model = tiny_hf_model(architecture, seed)
    target = NativeCausalLM(hf_model) if native else HFCausalLM(hf_model)
    return LoadedModel(f"tiny-{architecture}", CharTokenizer(), hf_model, target)


def tiny_engine(architecture: str = "llama", seed: int = 0, native: bool = True) -> Engine:
    return Engine(tiny_loaded(architecture, seed, native))


@pytest.fixture(autouse=True)
def drafter_registry():
    """Drafters a test registers (``@register("test-...")``) leave the global registry when it ends."""
    with restoring_registry():
        yield


@contextmanager
def registered(drafters: dict[str, type]):
    """``drafters`` (name: class) registered inside the block only: for a module's test drafters, from a
    module-scoped fixture, so that a scheduler or server the module shares can build them in every test."""
    with restoring_registry():
        for name, cls in drafters.items():
            register(name)(cls)
        yield


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_fp32() -> Engine:
    """The embedded model in float32, loaded once for the slow tests."""
    return Engine.from_pretrained(dtype="float32", weights="dense")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many tiny forwards: the test machine's cores are shared, and on tiny
    tensors one thread is many times faster than two (a module opts in with ``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
