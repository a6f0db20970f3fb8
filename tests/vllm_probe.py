"""Run by ``tests/test_vllm_integration.py`` with the vLLM environment's Python (not collected by pytest).

``python vllm_probe.py MODEL_DIR PROPOSER K PROMPTS_JSON`` generates greedily for every prompt in one batch
(``PROPOSER``: ``plain``, or a class path such as ``quickdraft.integrations.vllm.Suffix`` or
``vllm_probe.RecordingSuffix``) and prints one JSON line: ``{"outputs": [[token ids], ...]}``. Each prompt is
``{"text": ..., "max_tokens": N}``; different lengths make vLLM compact its batch rows as requests finish.

:class:`RecordingSuffix` is quickdraft's ``Suffix`` proposer that also appends, for every row and call, the
row's tokens and its draft to the JSON-lines file ``$QUICKDRAFT_TEST_RECORD``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from quickdraft.integrations.vllm import Suffix


class RecordingSuffix(Suffix):
    """``Suffix`` that records each call's rows (tokens so far) and drafts."""

    def propose(self, sampled_token_ids: Any, num_tokens_no_spec: Any, token_ids_cpu: Any, slot_mappings: Any = None,
                **kwargs: Any) -> list[list[int]]:
        drafts = super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings, **kwargs)
        rows = [token_ids_cpu[i, : int(num_tokens_no_spec[i])].tolist() if len(s) else None
                for i, s in enumerate(sampled_token_ids)]
        with open(os.environ["QUICKDRAFT_TEST_RECORD"], "a") as out:
            out.write(json.dumps({"rows": rows, "drafts": drafts}) + "\n")
        return drafts


def main() -> None:
    from vllm import LLM, SamplingParams

    model, proposer, k, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    spec = None if proposer == "plain" else {"method": "custom_class", "model": proposer, "num_speculative_tokens": k}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=1024,
              kv_cache_memory_bytes=128 << 20, seed=0, speculative_config=spec)
    tokenizer = llm.get_tokenizer()
    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": p["text"]}], add_generation_prompt=True,
                                            tokenize=False) for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=p["max_tokens"]) for p in prompts]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    print(json.dumps({"outputs": [list(o.outputs[0].token_ids) for o in outputs]}), flush=True)


if __name__ == "__main__":
    main()
