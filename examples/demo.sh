#!/usr/bin/env bash
# The main job on built-in data: pre-train DINO on Animal-MNIST (a few minutes on 2 CPU cores), then
# compare k-NN and linear-probe top-1 of raw pixels, the random-init encoder and the DINO encoder.
#   EPOCHS=40 OUT=runs/demo-dino bash examples/demo.sh   (or: EPOCHS=40 make demo)
set -euo pipefail
OUT=${OUT:-runs/demo-dino}
EPOCHS=${EPOCHS:-20}
DATA=builtin:animal-mnist

# Short-run DINO on 32-px images (README, "Benchmarks"): the 2 global crops only, milder (60-100%),
# and a slow teacher (EMA 0.9995). With the paper's defaults a few thousand steps collapse the features
# onto a handful of directions, and k-NN falls below random init.
# --overwrite: the demo replaces its own previous run folder.
cvfm pretrain --data "$DATA" --split train --method dino --model cvfm/tiny-resnet --epochs "$EPOCHS" \
  --opt local_crops=0 --opt global_scale=0.6,1 --opt momentum_teacher=0.9995 \
  --monitor "$DATA" --output "$OUT" --overwrite >/dev/null

rm -f "$OUT/results.jsonl"
for model in cvfm/pixels cvfm/tiny-resnet "$OUT"; do
  cvfm evaluate knn "$model" --data "$DATA" --output "$OUT/results.jsonl"
  cvfm evaluate linear "$model" --data "$DATA" --output "$OUT/results.jsonl"
done
python examples/results_table.py "$OUT/results.jsonl"
