#!/usr/bin/env bash
# The core built with AddressSanitizer + UndefinedBehaviorSanitizer (no recovery: the first error
# aborts the test) and its whole ctest suite run, the C ABI fuzz loop included. CPU only, so it
# needs no GPU and stays fast. CI runs it on every submission (.ci/run).
#   bash tests/cpp/run_sanitized.sh [build-dir]        (default build/asan)
# ADSC_FUZZ_ROUNDS (default 50000) sets the fuzz loop's length.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-build/asan}
flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
t0=$SECONDS
cmake -S . -B "$dir" -DADSC_WITH_TORCH=OFF -DADSC_WITH_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DADSC_FUZZ_ROUNDS="${ADSC_FUZZ_ROUNDS:-50000}" \
  "-DCMAKE_C_FLAGS=$flags" "-DCMAKE_CXX_FLAGS=$flags" \
  "-DCMAKE_EXE_LINKER_FLAGS=$flags" "-DCMAKE_SHARED_LINKER_FLAGS=$flags" >/dev/null
cmake --build "$dir" -j "${MAX_JOBS:-2}" >/dev/null
ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1 \
UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir "$dir" --output-on-failure
grep -h "c_api fuzz:" "$dir"/Testing/Temporary/LastTest.log || true
echo "sanitizer build and ctest: $((SECONDS - t0)) s"
