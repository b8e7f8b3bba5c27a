#!/usr/bin/env bash
# Every GPU check of adsc_ext in one script, for a session on a GPU machine (H100 / H200).
#
#   bash benchmarks/gpu_session.sh build-test   # build, CUDA tests, compute-sanitizer   (~5-8 min)
#   bash benchmarks/gpu_session.sh bench        # adsc bench at full size, twice           (~5-8 min)
#   bash benchmarks/gpu_session.sh all          # both
#
# Results go to $OUT (default: benchmarks/results/gpu-session): gpu_session.log with every step's
# output and its exit status, and the bench JSON + PNG files. A failing step is logged and the
# script goes on, so one run reports everything; the exit status is the number of failed steps.
# Python packages the machine lacks travel as wheels in .whl/ (see the device tool's README): at
# least hypothesis (three test modules import it; without it their CUDA tests do not even collect),
# and tqdm for a progress bar.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
failed=0

step() {  # step NAME COMMAND...: run, log, remember a failure
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return 0
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

build_test() {
  step env bash -c 'date -u; nvidia-smi; nvcc --version | tail -2; python3 -c "import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__)"'
  step install python3 -m pip install --no-build-isolation --no-deps -e .
  step core-build bash -c 'cmake -S . -B build/core-gpu -DADSC_WITH_TORCH=OFF -DADSC_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build/core-gpu -j "$MAX_JOBS"'
  step core-ctest ctest --test-dir build/core-gpu --output-on-failure
  local sanitizer
  sanitizer=$(command -v compute-sanitizer)
  for d in "$(dirname "$(command -v nvcc)")" /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
    [ -n "$sanitizer" ] || { [ -x "$d/compute-sanitizer" ] && sanitizer=$d/compute-sanitizer; }
  done
  sanitizer=${sanitizer:-compute-sanitizer}
  # The cases come from ctest itself (label "cuda", tests/cpp/CMakeLists.txt): name and command of
  # every test that runs kernels, so a new CUDA case is sanitized without editing this script.
  local cases
  cases=$(ctest --test-dir build/core-gpu -L cuda --show-only=json-v1 | python3 -c '
import json, shlex, sys
for t in json.load(sys.stdin)["tests"]:
    print(t["name"], shlex.join(t["command"]))')
  [ -n "$cases" ] || { echo "=== no ctest case is labelled cuda" | tee -a "$LOG"; failed=$((failed + 1)); }
  for tool in memcheck racecheck synccheck initcheck; do
    while read -r name command; do
      [ -n "$name" ] || continue
      # shellcheck disable=SC2086  # the command is a shell-quoted word list
      eval "step sanitizer-$tool-$name \"\$sanitizer\" --tool $tool --error-exitcode 1 $command"
    done <<<"$cases"
  done
  step pytest-cuda python3 -m pytest -q -m cuda -rs
  step pytest-all python3 -m pytest -q -rs
}

bench() {
  # 16-token blocks: the KV-cache target (decode reads the cache through the gather path);
  # 256-token blocks: decode reads the paged cache in place where flash-attn, or a torch whose
  # varlen_attn takes block_table (2.12+), is there; the record's config says which (decode_path).
  step bench-block16 python3 -m adsc_ext bench --out-dir "$OUT" --no-progress
  step bench-block256 python3 -m adsc_ext bench --out-dir "$OUT" --no-progress --block-size 256 \
    --batches 8,32 --no-hf --no-fastv
}

case $what in
  build-test) build_test ;;
  bench) bench ;;
  all) build_test; bench ;;
  *) echo "usage: $0 build-test|bench|all" >&2; exit 2 ;;
esac
echo "failed steps: $failed" | tee -a "$LOG"
exit $failed
