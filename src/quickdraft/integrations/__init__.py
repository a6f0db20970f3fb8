"""quickdraft's drafters inside other serving engines.

- :mod:`quickdraft.integrations.rows`: per-row drafter state for an engine that passes batch rows, not
  request ids (no engine imported);
- :mod:`quickdraft.integrations.vllm`: proposer classes for vLLM's ``custom_class`` speculative method;
- :mod:`quickdraft.integrations.model_dir`: the embedded GGUF model as a float32 safetensors folder, which
  vLLM can load.

Nothing here imports vLLM: these modules import in quickdraft's own environment too.
"""
