#!/usr/bin/env bash
# The main job on built-in data: pre-train DINO on Animal-MNIST (a few minutes on 2 CPU cores), then
# compare k-NN and linear-probe top-1 of raw pixels, the random-init encoder and the DINO encoder.
#   EPOCHS=30 OUT=runs/demo-dino bash examples/demo.sh   (or: EPOCHS=30 make demo)
set -euo pipefail
OUT=${OUT:-runs/demo-dino}
EPOCHS=${EPOCHS:-10}
DATA=builtin:animal-mnist

# --overwrite: the demo replaces its own previous run folder.
cvfm pretrain --data "$DATA" --split train --method dino --model cvfm/tiny-resnet \
  --epochs "$EPOCHS" --opt local_crops=2 --monitor "$DATA" --output "$OUT" --overwrite >/dev/null

rm -f "$OUT/results.jsonl"
for model in cvfm/pixels cvfm/tiny-resnet "$OUT"; do
  cvfm evaluate knn "$model" --data "$DATA" --output "$OUT/results.jsonl"
  cvfm evaluate linear "$model" --data "$DATA" --output "$OUT/results.jsonl"
done
python examples/results_table.py "$OUT/results.jsonl"
