"""Training data for a head, by self-distillation: the target answers prompts, and the head learns its answers.

Terms:

- **prompts**: from ``--prompts FILE`` (``.jsonl``: one object per line with a ``prompt``, ``instruction``,
  ``question`` or ``text`` field, or ``turns`` whose first element is used; any other file: one prompt per
  line), or written by the model itself, Magpie-style (Xu et al. 2024, "Magpie: Alignment Data Synthesis from
  Scratch by Prompting Aligned LLMs with Nothing"): the chat template up to the start of a user turn, and the
  model samples the question. Never from evaluation sets (Spec-Bench, MT-Bench, GSM8K, HumanEval).
- **answer**: the target's greedy continuation of the prompt (in chat form where the tokenizer has a chat
  template), generated in batches.
- **sample** (:class:`Sample`): one prompt + answer with the target's hidden states at the feature layers of
  every token (``[T, F * H]``, float16) and its **label** after every token: the target's argmax there
  (``labels[i]`` is the target's prediction of token ``i + 1``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quickdraft.engine import eos_token_ids
from quickdraft.errors import InvalidRequestError
from quickdraft.models.loading import LoadedModel
from quickdraft.models.native_session import NativeSession, verify_batch
from quickdraft.sampling import choose
from quickdraft.types import DraftTree, SamplingParams

#: Prompt fields read from a JSON line, in order of preference.
PROMPT_FIELDS = ("prompt", "instruction", "question", "text")
#: Names of evaluation sets whose prompts must never be trained on.
EVALUATION_SETS = ("spec-bench", "specbench", "mt-bench", "mt_bench", "gsm8k", "humaneval")
MARK = "\u2063QUESTION\u2063"


@dataclass
class Sample:
    """One prompt + answer (see the module docstring)."""

    tokens: torch.Tensor  # [T] long
    features: torch.Tensor  # [T, F * H] float16
    labels: torch.Tensor  # [T] long: the target's argmax after each token
    prompt_len: int


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` or text file (module docstring); refuses an evaluation set's file."""
    file = Path(path)
    if any(name in file.name.lower() or name in str(file.parent).lower() for name in EVALUATION_SETS):
        raise InvalidRequestError(f"{file} looks like an evaluation set; train on other prompts, never on "
                                  f"the benchmark you measure with")
    if not file.is_file():
        raise InvalidRequestError(f"prompt file {file} does not exist")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    return [prompt for prompt in (_prompt_of(json.loads(line)) for line in lines) if prompt]


def _prompt_of(record: Any) -> str | None:
    if isinstance(record, str):
        return record
    for name in PROMPT_FIELDS:
        if isinstance(record.get(name), str):
            return record[name]
    turns = record.get("turns")
    return turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], str) else None


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the model sees a user turn (its chat template where it has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def magpie_prefix(tokenizer: Any) -> list[int] | None:
    """The chat template up to where a user's question starts (None without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False)
    return list(tokenizer(text[: text.index(MARK)], add_special_tokens=False)["input_ids"])


@dataclass
class Decoded:
    """One row of :func:`decode`: the prompt and its continuation, and (where asked) the hidden states of the
    top layer and the feature layers of every token but the last ``{layer: [T - 1, H]}``."""

    tokens: list[int]
    prompt_len: int
    hidden: dict[int, list[torch.Tensor]]


@torch.inference_mode()
def decode(loaded: LoadedModel, prompts: list[list[int]], max_new_tokens: int, layers: tuple[int, ...] = (),
           sample: bool = False, seed: int = 0, eos: Iterable[int] = ()) -> list[Decoded]:
    """Continue every prompt in ONE batch of the native forward (rows of a shared KV cache, one token per row
    per forward: :func:`~quickdraft.models.native_session.verify_batch` with empty trees), greedily or sampled
    at temperature 1 with top-p 0.95; each row cut after its first EOS token. ``layers``: hidden states kept."""
    target = loaded.target
    cache = target.new_cache(max(len(p) for p in prompts) + max_new_tokens + 1, batch=len(prompts))
    sessions = [NativeSession(target, cache=cache, row=row) for row in range(len(prompts))]
    params = SamplingParams(temperature=1.0, top_p=0.95) if sample else SamplingParams()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for session, prompt in zip(sessions, prompts):
        out = session.prefill_hidden(prompt, layers)
        rows.append(Decoded(list(prompt), len(prompt), {k: [v] for k, v in out.hidden.items()}))
        rows[-1].tokens.append(choose(out.logits[-1], params, generator))
    stops, done = set(eos), [False] * len(prompts)
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        outs = verify_batch(sessions, [row.tokens[-1] for row in rows], [DraftTree.empty()] * len(rows), layers)
        for b, (session, row, out) in enumerate(zip(sessions, rows, outs)):
            session.commit([])
            for layer, value in out.hidden.items():
                row.hidden[layer].append(value[:1])
            done[b] = done[b] or row.tokens[-1] in stops
            row.tokens.append(choose(out.logits[0], params, generator))
    for row in rows:
        cut = next((i + 1 for i in range(row.prompt_len, len(row.tokens)) if row.tokens[i] in stops), len(row.tokens))
        row.tokens = row.tokens[:cut]
        row.hidden = {k: torch.cat(v)[: cut - 1] for k, v in row.hidden.items()}
    return rows


def magpie_prompts(loaded: LoadedModel, count: int, batch_size: int, seed: int = 0,
                   max_question_tokens: int = 48) -> list[list[int]]:
    """``count`` prompts (token ids, chat form) whose questions the model wrote itself (module docstring); for
    a model without a chat template, continuations sampled from a random token."""
    tokenizer = loaded.tokenizer
    prefix = magpie_prefix(tokenizer)
    eos = set(eos_token_ids(tokenizer, loaded.hf_model))
    generator = torch.Generator().manual_seed(seed)
    prompts: list[list[int]] = []
    while len(prompts) < count:
        size = min(batch_size, count - len(prompts))
        starts = [prefix or [int(torch.randint(loaded.target.vocab_size - 1, (1,), generator=generator))]
                  for _ in range(size)]
        decoded = decode(loaded, starts, max_question_tokens, sample=True, seed=seed + len(prompts), eos=eos)
        for start, row in zip(starts, decoded):
            question = row.tokens[len(start):]
            if prefix is None:
                prompts.append(start + question)
                continue
            text = tokenizer.decode([t for t in question if t not in eos], skip_special_tokens=True).strip()
            if len(text) >= 8:
                prompts.append(chat_ids(tokenizer, text))
    return prompts


@torch.inference_mode()
def collect(loaded: LoadedModel, prompts: list[list[int]], layers: list[int], max_new_tokens: int,
            batch_size: int, progress: Any = None, seconds: float | None = None) -> list[Sample]:
    """A :class:`Sample` per prompt: the greedy answers generated in batches (:func:`decode`), with the hidden
    states of ``layers`` (-1: the final normed state) and the target's argmax after every token. ``seconds``:
    start no new batch after that long (the prompts left are not answered)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    target = loaded.target
    if not hasattr(target, "final_norm"):
        raise InvalidRequestError("training a head needs the native forward (the Llama family)")
    top = target.num_layers - 1
    wanted = tuple(sorted({top, *[layer for layer in layers if layer >= 0]}))
    eos = set(eos_token_ids(loaded.tokenizer, loaded.hf_model))
    samples = []
    for first in range(0, len(prompts), batch_size):
        if deadline is not None and time.monotonic() > deadline:
            break
        for row in decode(loaded, prompts[first : first + batch_size], max_new_tokens, wanted, eos=eos):
            samples.append(_sample(target, row, layers, top))
        if progress is not None:
            progress(len(prompts[first : first + batch_size]))
    return samples


def _sample(target: Any, row: Decoded, layers: list[int], top: int) -> Sample:
    """Features and the argmax after every token but the last (whose states the decoding never computed; the
    sample leaves it out)."""
    normed = target.final_norm(row.hidden[top])
    labels = target.output_projection(normed[None])[0].float().argmax(-1)
    states = [normed if layer == -1 else row.hidden[layer] for layer in layers]
    features = torch.cat(states, -1).to(torch.float16).cpu()
    return Sample(torch.tensor(row.tokens[:-1]), features, labels.cpu(), row.prompt_len)
