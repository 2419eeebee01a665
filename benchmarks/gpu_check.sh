#!/usr/bin/env bash
# GPU check, at most 8 minutes on one GPU: CUDA tests, every method merged on the GPU against the CPU (relative error
# printed), device "auto" picking the GPU (the merge report names the device), then the realistic timings table on
# cuda, then one layer's OptMerge cost (benchmarks/optmerge_cost.py) on cuda. Fails fast, with one line, on a machine
# without a usable GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # OUT_DIR (default benchmarks/results) receives realistic_gpu.{txt,json}
#                                              # and optmerge_cost_gpu.txt
#
# Stages and their time limits (seconds; the sum stays under 480):
#   1. CUDA tests: pytest -m gpu (the device fixture's cuda cases, the conformance suite's included)  100
#   2. cross-check: every method on device auto (must be cuda) vs cpu, InternVL2.5-1B shapes with
#      1 decoder + 1 vision layer, full vocabulary, N = 2; relative error of the merged task vector
#      printed, above 1e-2 fails (DARE excluded: its random draws differ per device)                  200
#   3. timings on cuda, whatever time is left but 180 s: InternVL2.5-1B whole model and the Qwen2-VL-7B
#      subset (4 decoder layers + the whole vision tower), N = 5: task_arithmetic, ties, OptMerge (both
#      variants), SWUDI, and the I/O floor on the same files (mergekit is CPU-only: see realistic_cpu)
#   4. one layer's OptMerge cost on cuda, the time left split over three runs of optmerge_cost.py at
#      its default shapes (a run out of time leaves its rows so far, marked): --vs-swudi (896x4864,
#      3584x18944: exact LoRA OptMerge and the full variant's Adam step against SWUDI), the default
#      mode (896x4864, 4864x896, 3584x18944, 18944x3584 against the official m x m form) and --cache
#      at 3584x18944 (seconds per trial without and with the decomposition cache)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"

fail() { echo "gpu_check: FAIL: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || fail "no GPU on this machine (nvidia-smi not found)"
"$PY" - <<'EOF' || fail "torch cannot use a GPU (torch.cuda.is_available() is False)"
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$SECONDS

echo "== 1. CUDA tests"
timeout 100 "$PY" -m pytest -q -x -m gpu tests/ -p no:cacheprovider || fail "pytest -m gpu (exit $?)"

echo "== 2. GPU vs CPU, every method (device auto must merge on cuda)"
timeout 200 "$PY" benchmarks/realistic.py --families internvl2_5_1b --scale 0.04 --vocab-scale 1 --experts 2 \
    --device auto --no-timings --cross-check --json-out "$OUT/realistic_gpu_cross.json" \
    | tee "$OUT/realistic_gpu_cross.txt" || fail "cross-check"
"$PY" - "$OUT/realistic_gpu_cross.json" <<'EOF' || fail "device auto did not merge on the GPU, or GPU and CPU disagree"
import json, sys
rows = json.load(open(sys.argv[1]))["cross_check"]
bad = [r for r in rows if not r["device"].startswith("cuda")]
if bad:
    sys.exit(f"device auto merged on {bad[0]['device']} ({bad[0]['method']})")
loose = [r for r in rows if not r["random"] and r["rel_err"] > 1e-2]
if loose:
    sys.exit("relative error above 1e-2: " + ", ".join(f"{r['family']} {r['method']} {r['rel_err']:.1e}" for r in loose))
print(f"device auto merged on {rows[0]['device']} for all {len(rows)} runs; GPU vs CPU relative error at most "
      f"{max(r['rel_err'] for r in rows if not r['random']):.1e} (DARE excluded: its draws differ per device)")
EOF

echo "== 3. timings on cuda"
left=$(( 470 - 180 - (SECONDS - start) ))
[ "$left" -gt 60 ] || fail "no time left for the timings ($left s)"
timeout "$left" "$PY" benchmarks/realistic.py --families internvl2_5_1b,qwen2_vl_7b_subset --scale 1 --vocab-scale 1 \
    --big-layers 4 --experts 5 --device cuda --threads 4 --no-mergekit --heavy optmerge_full,swudi,optmerge_lora \
    --json-out "$OUT/realistic_gpu.json" \
    | tee "$OUT/realistic_gpu.txt" || fail "timings (limit $left s)"

echo "== 4. one layer's OptMerge cost on cuda"
: > "$OUT/optmerge_cost_gpu.txt"
runs=3
cost() {  # one optmerge_cost.py run within its share of the time left; out of time keeps the rows so far
    local limit=$(( (470 - (SECONDS - start)) / runs )) rc
    runs=$(( runs - 1 ))
    if [ "$limit" -lt 20 ]; then
        echo "optmerge_cost.py $*: skipped, no time left" | tee -a "$OUT/optmerge_cost_gpu.txt"
        return
    fi
    echo "\$ python benchmarks/optmerge_cost.py $*" >> "$OUT/optmerge_cost_gpu.txt"
    set +e
    PYTHONUNBUFFERED=1 timeout "$limit" "$PY" benchmarks/optmerge_cost.py "$@" | tee -a "$OUT/optmerge_cost_gpu.txt"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -eq 124 ]; then
        echo "(out of time after $limit s: the rows above are all it measured)" | tee -a "$OUT/optmerge_cost_gpu.txt"
    elif [ "$rc" -ne 0 ]; then
        fail "optmerge_cost.py $* (exit $rc)"
    fi
}
cost --vs-swudi --device cuda
cost --device cuda
cost --cache --device cuda --shapes 3584x18944 --steps 300 --adam-steps 300
echo "gpu_check: done in $(( SECONDS - start )) s"
