"""``quickdraft train``'s pieces on a tiny random model: data collection, a few training steps, save and reload.

Terms: a **head** is an EAGLE-style or Medusa head (:mod:`quickdraft.heads`); **held-out tau** and the losses
are defined in :mod:`quickdraft.train.loop`.
"""

from __future__ import annotations

import json

import pytest
import torch

from quickdraft.errors import InvalidRequestError
from quickdraft.heads import load_head, new_head
from quickdraft.train.data import collect, magpie_prompts, read_prompts
from quickdraft.train.loop import TrainOptions, batch_loss, draft_vocabulary, split, train

from conftest import tiny_loaded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = {"eagle": {}, "medusa": {"num_heads": 3}}


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", seed=0)


@pytest.fixture(scope="module")
def samples(loaded):
    """Answers of the tiny model to prompts it wrote itself (no chat template: sampled continuations)."""
    prompts = magpie_prompts(loaded, 12, 6, seed=0, max_question_tokens=10)
    return {kind: collect(loaded, prompts, new_head(kind, loaded.target, loaded.tokenizer, [0], **SHAPE[kind])
                          .config.feature_layers, 30, 6) for kind in ("eagle", "medusa")}


def test_collected_samples_hold_features_and_the_targets_argmax(loaded, samples):
    sample = samples["eagle"][0]
    assert sample.features.shape == (len(sample.tokens), 3 * 64) and sample.features.dtype == torch.float16
    # The answer is the target's greedy continuation: each answer token is the argmax after the one before.
    answer = slice(sample.prompt_len, len(sample.tokens))
    shifted = sample.labels[sample.prompt_len - 1 : len(sample.tokens) - 1]
    assert (shifted == sample.tokens[answer]).float().mean() > 0.9
    assert samples["medusa"][0].features.shape[1] == 64


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_training_lowers_the_loss_and_the_saved_head_reloads_to_identical_drafts(loaded, samples, kind, tmp_path):
    data = samples[kind]
    head = new_head(kind, loaded.target, loaded.tokenizer, draft_vocabulary(data, 64), **SHAPE[kind])
    options = TrainOptions(kind=kind, epochs=4, lr=1e-2, batch_size=4)
    training, _ = split(data, options.heldout, options.seed)
    index = torch.full((loaded.target.vocab_size,), -100, dtype=torch.long)
    index[head.draft_ids] = torch.arange(len(head.draft_ids))
    with torch.no_grad():
        before = float(batch_loss(head, training, index, options))
    history = train(head, data, options, tmp_path)
    with torch.no_grad():
        after = float(batch_loss(head, training, index, options))
    assert after < 0.8 * before, (before, after, history)
    assert history.loss[-1] < history.loss[0]
    reloaded = load_head(tmp_path, loaded.target, loaded.tokenizer, kind)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["kind"] == kind and config["trained"]["epochs"] == 4 and len(config["trained"]["heldout_tau"]) == 5
    feature = data[0].features[:8].float()
    with torch.no_grad():
        if kind == "eagle":
            tokens = data[0].tokens[1:9][None]
            mask = torch.ones(8, 8, dtype=torch.bool).tril()[None]
            mine = head.logits(head.step(head.fused(feature)[None], tokens, torch.arange(8)[None], None, mask)[0])
            theirs = reloaded.logits(reloaded.step(reloaded.fused(feature)[None], tokens, torch.arange(8)[None],
                                                   None, mask)[0])
        else:
            mine, theirs = head(feature), reloaded(feature)
    # float16 storage: the same drafts (argmax), scores equal to float16 precision
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
    assert torch.allclose(mine, theirs, atol=0.05, rtol=0.01)


def test_resume_continues_from_the_checkpoint(loaded, samples, tmp_path):
    data = samples["medusa"]
    vocab = draft_vocabulary(data, 64)
    first = new_head("medusa", loaded.target, loaded.tokenizer, vocab, **SHAPE["medusa"])
    train(first, data, TrainOptions(kind="medusa", epochs=1, batch_size=4), tmp_path)
    second = new_head("medusa", loaded.target, loaded.tokenizer, vocab, **SHAPE["medusa"])
    history = train(second, data, TrainOptions(kind="medusa", epochs=2, batch_size=4), tmp_path, resume=True)
    assert len(history.loss) == 2  # the first epoch came from the checkpoint


def test_prompts_from_files_and_never_from_an_evaluation_set(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"prompt": "hello"}\n{"turns": ["a question", "next"]}\n{"other": 1}\n')
    assert read_prompts(tmp_path / "mine.jsonl") == ["hello", "a question"]
    (tmp_path / "mine.txt").write_text("one\n\ntwo\n")
    assert read_prompts(tmp_path / "mine.txt") == ["one", "two"]
    (tmp_path / "gsm8k.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(InvalidRequestError, match="evaluation set"):
        read_prompts(tmp_path / "gsm8k.jsonl")
