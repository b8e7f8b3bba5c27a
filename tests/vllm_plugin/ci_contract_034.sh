#!/usr/bin/env bash
# The vLLM plugin's contract step on the newest vLLM it supports (called by .ci/run after
# ci_step.sh): vLLM 0.34.0 with torch 2.14.0 (the registry's CUDA builds; vLLM 0.33 and 0.34 have
# no CPU build), adsc_ext built into the venv, then tests/vllm_plugin/test_compat.py, the tests
# that need no engine. On a machine without a GPU vLLM's CUDA build imports and builds its
# configs on its CPU platform (ADSC_VLLM_CONTRACT_ONLY: conftest.py sets VLLM_TARGET_DEVICE=cpu
# and waives the platform's x86 triton-cpu check; no kernel runs).
#
# Lean on purpose (.ci/run must stay under 30 minutes): torch, torchvision, vLLM without its
# dependencies, then only the packages the contract tests import (requirements-contract.txt).
# Measured on the 2-core CI machine (shared with other jobs, so +-30 %), warm pip cache: 7.7 min
# (torch + torchvision 153 s: unpacking 4.5 GB of CUDA libraries dominates, a cold cache adds
# little; vllm + requirements 149 s, 204 s for the requirements alone with a cold cache; the
# adsc_ext build 96 s; the tests 53 s).
#
# Environment: ADSC_VLLM034_VENV (default .venv-vllm034), VLLM_VERSION (default 0.34.0; 0.33.0
# was checked the same way).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
. tests/vllm_plugin/ci_lib.sh
VLLM_STEP_NAME="vllm contract step"
version=${VLLM_VERSION:-0.34.0}
vllm_venv "${ADSC_VLLM034_VENV:-.venv-vllm034}"

vllm_step "torch 2.14.0 (CUDA build) + torchvision 0.29.0"
"${pip[@]}" install torch==2.14.0 torchvision==0.29.0
vllm_step "vllm $version (no dependencies) and what the contract tests import"
"${pip[@]}" install --no-deps "vllm==$version"
"${pip[@]}" install -r tests/vllm_plugin/requirements-contract.txt

vllm_step "adsc_ext against the venv's torch"
vllm_build_adsc

vllm_step "tests/vllm_plugin/test_compat.py on vLLM $version"
(cd tests/vllm_plugin && ADSC_VLLM_CONTRACT_ONLY=1 "$py" -m pytest -q -p no:cacheprovider \
  "$root/tests/vllm_plugin/test_compat.py")
vllm_step "done"
