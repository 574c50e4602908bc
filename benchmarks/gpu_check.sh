#!/usr/bin/env bash
# Everything this project measures on a GPU, in one command (at most 8 minutes on one GPU),
# its tables written to a folder (docs/gpu.md says what each one is):
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--only VARIANT ...] [--skip STEP ...]
#
#   environment.md          GPU, driver, torch, CUDA, triton, Detectron2 versions, commit
#   cuda_tests.txt          pytest -k cuda: the tests marked `cuda` and those named for CUDA
#   families.md / .json     every COCO family: training step and inference, batch 2 at
#                           800 x 1216, float32 and bfloat16 autocast: images/s, peak memory
#   losses.md / .json       the deformable shapes config, 300 iterations, float32 (seeds 1
#                           and 2) and bfloat16 (seed 1) through train_net.py, side by side
#   deformable_attention.txt  benchmarks/deformable_attention.py, if it exists
#   summary.md              each step's status and time, then every table
#
# Each step runs under its own time limit and a failed step does not stop the others, so a
# short loan of a GPU brings back every measurement that works.
#
# --dry-run: the same steps on CPU, small (tests/test_gpu_check.py runs it): the CUDA tests
# are collected, not run; tiny models; 2 training iterations; the attention benchmark's
# --help. It checks the script, not the speed. --only: the families step measures these
# variants of benchmarks/gpu_check.py only. --skip: leave out steps (tests, families, losses,
# attention).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DRY=0
OUT=""
ONLY=()
SKIP=" "
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?gpu_check.sh: --out needs a folder}"; shift ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do ONLY+=("$1"); shift; done
            continue ;;
    --skip) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do SKIP+="$1 "; shift; done
            continue ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$REPO/output/gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs"
cd "$REPO" || exit 1

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: CUDA is not available here; --dry-run runs the CPU part" >&2
  exit 1
fi
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; TINY=(--tiny); ITERS=2
  PYTEST=(-m pytest tests -q -k cuda --collect-only -p no:cacheprovider)
  ATTENTION=(--help)
  LIMITS=(60 300 300 60)
else
  DEVICE=cuda; TINY=(); ITERS=300
  PYTEST=(-m pytest tests -q -k cuda -rs -p no:cacheprovider)
  ATTENTION=()
  # seconds: tests, families, losses, attention benchmark (with the rest: under 8 minutes)
  LIMITS=(100 150 150 60)
fi
ONLY_ARGS=()
[ ${#ONLY[@]} -gt 0 ] && ONLY_ARGS=(--only "${ONLY[@]}")

STATUS=()
step() {  # step KEY NAME LIMIT OUTPUT COMMAND...: run with a time limit, log, record the status
  local key="$1" name="$2" limit="$3" output="$4" start rc
  shift 4
  if [ "${SKIP/ $key /}" != "$SKIP" ]; then
    STATUS+=("| $name | skipped (--skip $key) | - | - |")
    return
  fi
  echo "== $name (limit ${limit} s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$output" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  local status="ok"
  [ $rc -ne 0 ] && status="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
  STATUS+=("| $name | $status | $took s | $(basename "$output") |")
  echo "   $status in $took s"
}

{
  echo "# Environment"
  echo
  echo "- date: $(date -Iseconds)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "- host: $(hostname), $(nproc) CPU cores"
  "$PY" - <<'EOF'
import importlib.metadata as md
import platform

import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"

print(f"- python {platform.python_version()}, torch {torch.__version__}, "
      f"torchvision {version('torchvision')}, triton {version('triton')}, "
      f"detectron2 {version('detectron2') if version('detectron2') != 'not installed' else version('pb1-detectron2')}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
          f"{p.major}.{p.minor}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"bfloat16: {torch.cuda.is_bf16_supported()}")
else:
    print("- GPU: none (dry run on CPU)")
EOF
  command -v nvidia-smi > /dev/null && echo && echo '```' && nvidia-smi && echo '```'
} > "$OUT/environment.md" 2>&1

step tests "CUDA tests" "${LIMITS[0]}" "$OUT/cuda_tests.txt" "$PY" "${PYTEST[@]}"
step families "families" "${LIMITS[1]}" "$OUT/logs/families.log" \
  "$PY" benchmarks/gpu_check.py families "$OUT" --device "$DEVICE" "${TINY[@]}" "${ONLY_ARGS[@]}"
step losses "losses" "${LIMITS[2]}" "$OUT/logs/losses.log" \
  "$PY" benchmarks/gpu_check.py losses "$OUT" --device "$DEVICE" --iters "$ITERS" "${TINY[@]}"
if [ -f benchmarks/deformable_attention.py ]; then
  step attention "deformable attention" "${LIMITS[3]}" "$OUT/deformable_attention.txt" \
    "$PY" benchmarks/deformable_attention.py "${ATTENTION[@]}"
else
  STATUS+=("| deformable attention | not run: benchmarks/deformable_attention.py does not exist | - | - |")
fi

{
  echo "# gpu_check$([ "$DRY" = 1 ] && echo ' --dry-run (CPU: checks the script, measures nothing)')"
  echo
  echo "| step | status | time | output |"
  echo "|---|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  echo
  cat "$OUT/environment.md"
  for table in families.md losses.md; do
    echo
    if [ -f "$OUT/$table" ]; then cat "$OUT/$table"; else echo "($table: not written, see logs/)"; fi
  done
  echo
  [ -f "$OUT/cuda_tests.txt" ] && echo "CUDA tests: $(tail -n 1 "$OUT/cuda_tests.txt")"
} > "$OUT/summary.md"
echo "tables in $OUT (summary.md)"
grep -q "FAILED" "$OUT/summary.md" && exit 1
exit 0
