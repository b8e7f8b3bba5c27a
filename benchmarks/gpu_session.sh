#!/usr/bin/env bash
# Every GPU check of adsc_ext, sized for a lent GPU session: 15 minutes of device time in all
# (machine start included), at most 10 minutes per command.
#
#   bash benchmarks/gpu_session.sh essential   # call 1 (< 9.4 min): build (sm_90 only), core ctest with
#                                              # CUDA, compute-sanitizer memcheck + racecheck on the core's
#                                              # CUDA cases, the kernel CUDA tests, one bench configuration
#                                              # that writes every spec-8 record
#   bash benchmarks/gpu_session.sh extra       # call 2, optional (< 4 min, on the still-warm machine): the
#                                              # LLaVA-1.5-7B CUDA tests, synccheck + initcheck, HF + FastV bench
#   bash benchmarks/gpu_session.sh all         # both, for a machine without the device budget
#
# Budget (seconds). "here" was measured on this project's 2-core CPU machine (nvcc 13.0, no GPU,
# shared with other jobs: wall time, CPU time in brackets); "budget" is the estimate for the 16-core
# H200 machine; "limit" is the step's hard timeout, itself cut to what is left of the call's
# DEADLINE (essential: 560 s, so the 590 s command limit is never hit; extra: 230 s), and a step
# with under 20 s left is skipped and logged. Estimates, not readings: replace them with the
# "=== NAME: exit RC after S s" lines (and budget.tsv) of the first real run.
#
#   step                     here         budget  limit   what
#   (machine start)             -            90      -    device time, outside the script
#   call 1: essential
#   env                         1             5     30    versions, nvidia-smi
#   install                   202 (50)       75    200    pip install -e . (torch ext + core, sm_90 only)
#   core-build                 26 (19)       15     90    the torch-free core + C++ tests, sm_90
#   core-ctest                  3            10     60    ctest (its CUDA cases run on the GPU)
#   sanitizer: 2 tools x 4      -            60  30 each  memcheck, racecheck on `ctest -L cuda`
#   pytest-cuda-kernels         -            45    120    pytest -m cuda without the two 7B model tests
#   bench                      81 (36)*     200    300    adsc bench --no-hf --repeats 3 (*: --tiny here)
#   total                                   410    560    + start 90 + copies = ~8.5 min
#   call 2: extra (at once, on the warm machine: no second start)
#   pytest-cuda-models          -           120    180    the 7B bf16 HF test, the engine bf16-vs-fp32 test
#   bench-hf                    -            90    120    HF generate + FastV vs HF ADSC (b8, b32, 64 tokens)
#   sanitizer: 2 tools x 4      -            40  30 each  synccheck, initcheck (what time is left)
#   total                                   250    230    ~4 min: 8.5 + 4 = ~12.5 of the 15 min
#
# Results go to $OUT (default: benchmarks/results/gpu-session): gpu_session.log with every step's
# output, exit status and seconds; budget.tsv (step, seconds, limit, exit); the bench JSON + PNG.
# A failing step is logged and the script goes on, so one run reports everything; the exit status
# is the number of failed steps. The H200 image has pytest, hypothesis and matplotlib; a package it
# lacks can travel as wheels in .whl/ (see the device tool's README).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# CUDA ops or a build error saying why not: under `auto` a partial toolkit would quietly give CPU
# ops, and every CUDA test would skip.
export ADSC_TARGET_DEVICE=${ADSC_TARGET_DEVICE:-cuda}
failed=0
DEADLINE=${DEADLINE:-}

. "$(dirname "$0")/steps.sh"  # step NAME LIMIT_S COMMAND...: timed, logged, budget.tsv

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The model-level CUDA tests (LLaVA-1.5-7B shapes): call 2. The kernel-level ones: call 1.
MODEL_TESTS=(tests/test_hf_llava.py::test_llava15_7b_bf16_cuda tests/test_runtime.py::test_cuda_bf16_engine_matches_fp32)

build() {
  step env 30 bash -c 'date -u; nvidia-smi; nvcc --version | tail -2; python3 -c "import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__)"'
  step install 200 python3 -m pip install --no-build-isolation --no-deps -e .
  step core-build 90 bash -c 'cmake -S . -B build/core-gpu -DADSC_WITH_TORCH=OFF -DADSC_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build/core-gpu -j "$MAX_JOBS"'
  step core-ctest 60 ctest --test-dir build/core-gpu --output-on-failure
}

sanitize() {  # sanitize TOOL...: compute-sanitizer with each tool on every core CUDA case
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
  for tool in "$@"; do
    while read -r name command; do
      [ -n "$name" ] || continue
      # shellcheck disable=SC2086  # the command is a shell-quoted word list
      eval "step sanitizer-$tool-$name 30 \"\$sanitizer\" --tool $tool --error-exitcode 1 $command"
    done <<<"$cases"
  done
}

essential() {
  DEADLINE=${DEADLINE:-560}  # seconds: a 590 s command limit, less the copy of $OUT
  build
  sanitize memcheck racecheck
  local deselect=()
  for t in "${MODEL_TESTS[@]}"; do deselect+=(--deselect "$t"); done
  step pytest-cuda-kernels 120 python3 -m pytest -q -m cuda -rs -p no:cacheprovider "${deselect[@]}"
  # One configuration, every spec-8 record: prefill b1/b8 (decoder-only and TTFT), the KV bytes,
  # decode b32/b64 at 256 new tokens (paged where the backend reads 256-token pages in place, with
  # CUDA graphs), FastV against the engine's ADSC prefill, the kernels on >= 4x L2 buffers.
  step bench 300 python3 -m adsc_ext bench --out-dir "$OUT" --no-hf --repeats 3
}

extra() {
  DEADLINE=${DEADLINE:-$((SECONDS + 230))}
  python3 -c "import adsc_ext._C" 2>/dev/null || build  # a fresh machine: build first
  step pytest-cuda-models 180 python3 -m pytest -q -rs -p no:cacheprovider "${MODEL_TESTS[@]}"
  # HF generate() with and without apply_adsc, and FastV against the HF ADSC prefill (same path).
  step bench-hf 120 python3 -m adsc_ext bench --out-dir "$OUT" --repeats 2 --prefill-batches 8 \
    --decode-batches 32 --new-tokens 64
  sanitize synccheck initcheck
}

sed -n '/^#   step /,/^#   total.*of the 15 min/p' "$0" | tee -a "$LOG"  # the budget, for the log
printf 'step\tseconds\tlimit\texit\n' >>"$OUT/budget.tsv"
case $what in
  essential) essential ;;
  extra) extra ;;
  all) DEADLINE=100000; essential; extra; step pytest-all 900 python3 -m pytest -q -rs ;;
  *) echo "usage: $0 essential|extra|all" >&2; exit 2 ;;
esac
column -t -s $'\t' "$OUT/budget.tsv" 2>/dev/null | tee -a "$LOG" || cat "$OUT/budget.tsv"
echo "failed steps: $failed" | tee -a "$LOG"
exit $failed
