# Sourced by benchmarks/gpu_session.sh and benchmarks/vllm_gpu.sh: one timed, logged step runner
# for a device session whose command has a hard time limit.
#
#   step NAME LIMIT_S COMMAND...
#
# runs COMMAND under `timeout LIMIT_S` (cut to what is left before $DEADLINE, in $SECONDS), appends
# its output to $LOG, prints "=== NAME: exit RC after S s", records a row (step, seconds, limit,
# exit) in $OUT/budget.tsv and counts a failure in $failed. With under 20 s left it skips the step
# and says so rather than be killed mid-step. Always returns 0, so one failed step does not end
# the session.
failed=${failed:-0}

step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: SKIPPED, ${left} s left of the call's ${DEADLINE} s" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\n' "$name" 0 "$limit" skipped >>"$OUT/budget.tsv"
    failed=$((failed + 1))
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "=== $name: TIMED OUT after $limit s" | tee -a "$LOG"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  printf '%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$limit" "$rc" >>"$OUT/budget.tsv"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return 0
}
