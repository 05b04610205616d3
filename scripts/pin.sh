#!/usr/bin/env bash
# Refresh constraints.txt: install outlierq unpinned into a scratch environment and record every
# version the registry serves today. Run the tests against the new pins before committing them.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
VENV="$scratch/venv" OUTLIERQ_UNPINNED=1 bash scripts/setup.sh
{
  echo "# Every package scripts/setup.sh installs, at the versions CI last tested (.ci/run uses them)."
  echo "# Refresh with: bash scripts/pin.sh   (then run the tests). pyproject.toml keeps wide ranges."
  # The local tag (+cpu) names the build, not the release: drop it so the pin matches any torch 2.13.0.
  "$scratch/venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
# vLLM's own environment (the serving check), where this machine can run it
if VLLM_VENV="$scratch/vllm" OUTLIERQ_UNPINNED=1 bash scripts/vllm_setup.sh; then
  { echo "# vLLM's own environment (.venv-vllm, scripts/vllm_setup.sh) at the versions CI last tested."
    echo "# Refresh with: bash scripts/pin.sh"
    "$scratch/vllm/bin/pip" freeze --exclude-editable; } > constraints-vllm.txt.tmp
  mv constraints-vllm.txt.tmp constraints-vllm.txt
  echo "wrote constraints-vllm.txt"
fi
