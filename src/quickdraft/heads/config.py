"""What a trained head is for, saved as ``config.json`` beside its weights (``head.safetensors``).

Terms:

- **feature layers**: the target's decoder layers whose outputs (hidden states) the head reads. An EAGLE head
  reads a low, a middle and the top layer (EAGLE-3: Li et al. 2025); a Medusa head reads the final normed
  hidden state, layer ``-1`` (Medusa: Cai et al. 2024).
- **draft vocabulary**: the ids of the target tokens a head can propose (the most frequent ones in its
  training data); its output layer scores only them, and they are mapped back to the target's full ids.
- **vocabulary hash**: a digest of the tokenizer's id -> token string map; two tokenizers with the same hash
  give every id the same meaning.
- **target facts** (:class:`TargetFacts`): the hidden size, vocabulary size and hash, and layer count of a
  loaded target. A head loads only onto a target whose facts equal those it was trained for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quickdraft.errors import InvalidRequestError
from quickdraft.models.base import TargetModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "head.safetensors"
KINDS = ("eagle", "medusa")
#: Heads shipped with quickdraft, one folder each (``<kind>-<model>``).
SHIPPED_DIR = Path(__file__).parent / "shipped"


class HeadMismatchError(InvalidRequestError):
    """A head trained for another target (its message names every fact that differs)."""


@dataclass
class TargetFacts:
    """What a head must agree on with its target (see the module docstring)."""

    name: str
    hidden_size: int
    vocab_size: int
    vocab_hash: str
    num_layers: int

    @classmethod
    def of(cls, target: TargetModel, tokenizer: Any) -> TargetFacts:
        config = hf_config(target)
        name = str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "?"))
        return cls(name, int(config.hidden_size), int(target.vocab_size),
                   vocabulary_hash(tokenizer, target.vocab_size), int(target.num_layers))


@dataclass
class HeadConfig:
    """A head's description: its kind (``eagle`` | ``medusa``), the target facts it was trained for, the
    feature layers and draft vocabulary, its own shape, and what training measured."""

    kind: str
    target: str
    hidden_size: int
    vocab_size: int
    vocab_hash: str
    num_layers: int
    feature_layers: list[int]
    draft_vocab: list[int]
    intermediate_size: int = 0  # eagle: the MLP's width (0: twice the hidden size)
    num_heads: int = 4  # medusa: K, the tokens ahead it predicts; eagle: attention heads
    #: medusa: ``accuracy[k][r]``, how often head ``k``'s rank-``r`` token was the target's (held-out data)
    accuracy: list[list[float]] = field(default_factory=list)
    trained: dict[str, Any] = field(default_factory=dict)  # steps, epochs, loss, tau estimate, command

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"head kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def for_target(cls, kind: str, facts: TargetFacts, feature_layers: list[int], draft_vocab: list[int],
                   **shape: Any) -> HeadConfig:
        return cls(kind, facts.name, facts.hidden_size, facts.vocab_size, facts.vocab_hash, facts.num_layers,
                   list(feature_layers), list(draft_vocab), **shape)

    def differences(self, facts: TargetFacts) -> list[str]:
        """The facts in which ``facts`` differ from the head's, in words (empty: the head fits)."""
        wanted = [("hidden size", self.hidden_size, facts.hidden_size),
                  ("vocabulary size", self.vocab_size, facts.vocab_size),
                  ("vocabulary (tokenizer hash)", self.vocab_hash[:12], facts.vocab_hash[:12]),
                  ("layer count", self.num_layers, facts.num_layers)]
        return [f"{what}: head {mine}, model {theirs}" for what, mine, theirs in wanted if mine != theirs]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> HeadConfig:
        return cls(**json.loads(text))


def hf_config(target: TargetModel) -> Any:
    """The transformers config of a loaded target (native or fallback)."""
    config = getattr(target, "config", None)
    if config is None:
        config = target.hf_model.config
    return config


def vocabulary_hash(tokenizer: Any, vocab_size: int) -> str:
    """SHA-256 of the tokenizer's ``id -> token`` map (``get_vocab`` where it has one, else each id decoded)."""
    digest = hashlib.sha256()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    if vocab:
        for token, index in sorted(vocab.items(), key=lambda item: item[1]):
            digest.update(f"{index}\t{token}\n".encode())
    else:
        for index in range(vocab_size):
            digest.update(f"{index}\t{tokenizer.decode([index], skip_special_tokens=False)}\n".encode())
    return digest.hexdigest()


def save_head(directory: str | Path, config: HeadConfig, module: torch.nn.Module) -> Path:
    """Write ``config.json`` and ``head.safetensors`` (the module's trained weights only) into ``directory``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: value.detach().to(torch.float16).contiguous() for name, value in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(config.to_json())
    return folder


def read_config(directory: str | Path) -> HeadConfig:
    """The head config in ``directory``; a clear error where there is none."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InvalidRequestError(f"no trained head in {directory}: {CONFIG_FILE} is missing "
                                  f"(train one with `quickdraft train`)")
    return HeadConfig.from_json(path.read_text())


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return {name: value.float() for name, value in load_file(str(Path(directory) / WEIGHTS_FILE)).items()}


def check_fits(config: HeadConfig, facts: TargetFacts, directory: str | Path) -> None:
    """Raise :class:`HeadMismatchError` naming what differs when the head in ``directory`` is not for ``facts``."""
    differences = config.differences(facts)
    if differences:
        raise HeadMismatchError(f"the {config.kind} head in {directory} was trained for another model "
                                f"({config.target}); it differs in " + "; ".join(differences)
                                + ". Train one for this model with `quickdraft train`.")


def shipped_head(kind: str, target: TargetModel, tokenizer: Any) -> Path:
    """The folder of the shipped ``kind`` head that fits ``target``; a clear error naming the shipped heads
    and how each differs where none does."""
    facts = TargetFacts.of(target, tokenizer)
    tried = []
    for folder in sorted(SHIPPED_DIR.glob(f"{kind}-*")) if SHIPPED_DIR.is_dir() else []:
        config = read_config(folder)
        differences = config.differences(facts)
        if not differences:
            return folder
        tried.append(f"{folder.name} ({'; '.join(differences)})")
    shipped = "; ".join(tried) if tried else "none is shipped"
    raise HeadMismatchError(f"no shipped {kind} head fits this model ({facts.name}): {shipped}. Train one with "
                            f"`quickdraft train --drafter {kind} --model M -o DIR` and pass "
                            f"--drafter-option head=DIR")


def draft_vocab_tensor(config: HeadConfig) -> torch.Tensor:
    return torch.tensor(config.draft_vocab, dtype=torch.long)


def output_rows(target: TargetModel, ids: torch.Tensor) -> torch.Tensor:
    """The target's output-layer rows ``[len(ids), hidden]`` for ``ids`` (float32, frozen): the head's output
    layer over the draft vocabulary."""
    weight = target.hf_model.lm_head.weight if hasattr(target, "hf_model") else None
    if weight is not None and weight.numel() and weight.shape[0] == target.vocab_size:
        return weight.detach()[ids].float().clone()
    # The weights were handed to a holder (quantized): read the rows back through the output projection.
    hidden = hf_config(target).hidden_size
    eye = torch.eye(hidden, dtype=target.dtype, device=target.device).unsqueeze(0)
    return target.output_projection(eye)[0].float().T[ids.to(target.device)].cpu().clone()


def embedding_table(target: TargetModel) -> torch.nn.Module:
    """The target's token-embedding lookup (frozen; the head does not save it)."""
    return target.embed_tokens if hasattr(target, "embed_tokens") else target.hf_model.get_input_embeddings()


def default_feature_layers(kind: str, num_layers: int) -> list[int]:
    """EAGLE: a low, the middle and the top decoder layer (EAGLE-3); Medusa: the final normed state (-1)."""
    if kind == "medusa":
        return [-1]
    return sorted({num_layers // 10, num_layers // 2, num_layers - 1})
