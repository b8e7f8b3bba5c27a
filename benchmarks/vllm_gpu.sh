#!/usr/bin/env bash
# The vLLM plugin's GPU check, owed since the plugin exists: ADSC served by vLLM against vLLM's own
# LLaVA on one CUDA GPU. NOT RUN YET: no GPU machine this project can reach has vLLM installed.
# Run it where vLLM 0.32-0.34 with CUDA is installed, with adsc_ext built against that vLLM's
# torch:
#
#   pip install "vllm>=0.32,<0.35" && pip install --no-build-isolation -e ".[vllm]"   # from a checkout
#   bash benchmarks/vllm_gpu.sh    # < 10 min on an H100; nothing is downloaded
#
# Steps (each under a hard timeout, logged; a failing step is logged and the script goes on; the
# exit status is the number of failed steps):
#   env          versions, nvidia-smi
#   tests        tests/vllm_plugin on the GPU: the end-to-end tests against transformers'
#                apply_adsc run on vLLM's CUDA platform (FLASH_ATTN or TRITON_ATTN, async
#                scheduling on by default, vLLM 0.34's extensible KV cache), which the CPU CI
#                cannot reach
#   throughput   LLaVA-1.5-7B shapes (random weights: load_format="dummy"), bf16, batch 32, one
#                image + 63 words per request, 256 new tokens, a KV budget that holds all 32:
#                generated tokens per second, ADSC / vLLM
#   kv-budget    the same requests at a 4 GiB KV budget: the most requests running at once and
#                the KV bytes each request holds: vLLM's own 896 tokens x 512 KiB = 448 MiB;
#                ADSC 8:2,16:2,24:2 holds 66 % of that at the end of a request (52 % after the
#                prompt), so about 13 requests fit where vLLM's own fits 9
# Each bench step writes one JSON record (benchmarks/vllm_bench.py) to $OUT.
#
# Environment: OUT (default benchmarks/results/vllm-gpu), PYTHON (default python3),
# THROUGHPUT_KV_BYTES (default 24 GiB), BUDGET_KV_BYTES (default 4 GiB), DEADLINE (seconds for
# the whole script, default 570), STEPS (default "env tests throughput kv-budget"); MODEL
# (default llava-1.5-7b) and NEW_TOKENS (default 256) for a dry run elsewhere, e.g. on a CPU:
#   MODEL=tiny24 NEW_TOKENS=16 THROUGHPUT_KV_BYTES=67108864 BUDGET_KV_BYTES=10485760 \
#     STEPS="env throughput kv-budget" bash benchmarks/vllm_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/vllm-gpu}
PYTHON=${PYTHON:-python3}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
LOG="$OUT/vllm_gpu.log"
export PYTHONUNBUFFERED=1
failed=0
stamp=$(date -u +%Y%m%d-%H%M%S)

. "$(dirname "$0")/steps.sh"  # step NAME LIMIT_S COMMAND...: timed, logged, budget.tsv

BENCH=("$PYTHON" benchmarks/vllm_bench.py --model "${MODEL:-llava-1.5-7b}" --requests 32
       --new-tokens "${NEW_TOKENS:-256}" --text 63 --max-model-len 2048 --max-num-seqs 32
       --workdir "${TMPDIR:-/tmp}/adsc-vllm-gpu")
STEPS=" ${STEPS:-env tests throughput kv-budget} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

want env && step env 30 bash -c "date -u; nvidia-smi; $PYTHON -c 'import torch, vllm, transformers, adsc_ext; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"vllm\", vllm.__version__, \"transformers\", transformers.__version__)'"
# From tests/vllm_plugin, so `import adsc_ext` is the installed build (as in ci_step.sh).
want tests && step tests 240 bash -c "cd tests/vllm_plugin && $PYTHON -m pytest -q -x -p no:cacheprovider ."
want throughput && step throughput 150 "${BENCH[@]}" --kv-bytes "${THROUGHPUT_KV_BYTES:-25769803776}" \
  --out "$OUT/vllm-throughput-$stamp.json"
want kv-budget && step kv-budget 150 "${BENCH[@]}" --kv-bytes "${BUDGET_KV_BYTES:-4294967296}" \
  --out "$OUT/vllm-kv-budget-$stamp.json"
for f in "$OUT"/vllm-*-"$stamp".json; do
  [ -f "$f" ] && "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1], r.get('adsc_vs_vllm'))" "$f" | tee -a "$LOG"
done
echo "=== $failed failed step(s); log: $LOG" | tee -a "$LOG"
exit "$failed"
