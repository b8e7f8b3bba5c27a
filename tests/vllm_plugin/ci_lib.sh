#!/usr/bin/env bash
# Shared by the vLLM CI steps (ci_step.sh, ci_contract_034.sh): source it from the repository
# root. ci_step.sh says why each install.
#
#   vllm_venv DIR               create the venv DIR if missing; sets $py and the pip command $pip
#   vllm_build_adsc             build adsc_ext into it from a copy of the tree (tests/ and
#                               benchmarks/ left out), against the venv's torch, CPU ops only
#   vllm_step MESSAGE           print MESSAGE with the seconds since the step began

_vllm_start=$(date +%s)
vllm_step() { echo "[${VLLM_STEP_NAME:-vllm step}, $(( $(date +%s) - _vllm_start )) s] $*"; }

vllm_venv() {
  local venv
  venv=$(realpath -m "$1")
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
  # --isolated: the machine's pip config points at a local CPU torch wheel and caps versions
  pip=("$py" -m pip --isolated --disable-pip-version-check -q)
}

vllm_build_adsc() {
  local root src
  root=$(pwd)
  src=$(mktemp -d)
  _vllm_src=$src
  trap 'rm -rf "$_vllm_src"' EXIT  # also when the build fails (set -e ends the script)
  git ls-files -z --cached --others --exclude-standard -- . ':!tests' ':!benchmarks' \
    | tar --null -T - -cf - | tar -xf - -C "$src"
  # CPU ops only (the tests run on CPUs): the build never looks for a CUDA toolkit, not even
  # with torch's CUDA build
  (cd "$src" && ADSC_TARGET_DEVICE=cpu MAX_JOBS=${MAX_JOBS:-2} \
    "${pip[@]}" install --no-build-isolation --no-deps --force-reinstall .)
  rm -rf "$src"
  cd "$root"
}
