#!/usr/bin/env bash
# GPU smoke check: every method pre-trains on Animal-MNIST in mixed precision on one GPU, then is
# scored (k-NN, linear) against the random-init encoder. Results go to $OUT (default runs/gpu_check).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python3}
DATA=builtin:animal-mnist
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$PY - <<'PY'
import torch, timm, transformers, accelerate
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "timm", timm.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)
PY
run() {  # method epochs precision extra-args...
  local m=$1 e=$2 p=$3; shift 3
  local t0=$SECONDS
  $PY -m cvfm pretrain --data "$DATA" --split train --method "$m" --epochs "$e" --precision "$p" \
    --batch-size 256 --num-workers 8 --output "$OUT/$m-$p" --overwrite "$@" > /dev/null
  echo "$m $p: ${e} epochs in $((SECONDS - t0)) s"
  $PY -m cvfm evaluate knn "$OUT/$m-$p" --data "$DATA" --num-workers 8 --output "$OUT/results.jsonl"
  $PY -m cvfm evaluate linear "$OUT/$m-$p" --data "$DATA" --num-workers 8 --output "$OUT/results.jsonl"
}
rm -f "$OUT/results.jsonl"
$PY -m cvfm evaluate knn cvfm/tiny-resnet --data "$DATA" --num-workers 8 --output "$OUT/results.jsonl"
$PY -m cvfm evaluate linear cvfm/tiny-resnet --data "$DATA" --num-workers 8 --output "$OUT/results.jsonl"
run simclr 6 bf16
run byol 6 bf16
run dino 8 bf16 --opt local_crops=6
run simclr 2 fp16
$PY examples/results_table.py "$OUT/results.jsonl"
grep -h images_per_s "$OUT"/*/metrics.jsonl | tail -n 4 | cut -c1-200
