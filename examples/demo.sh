#!/usr/bin/env bash
# The main job on built-in data: pre-train SimCLR on Animal-MNIST (about 5 minutes on 2 CPU cores), then
# compare k-NN and linear-probe top-1 of raw pixels, the random-init encoder and the SimCLR encoder.
#   EPOCHS=40 OUT=runs/demo-simclr bash examples/demo.sh   (or: EPOCHS=40 make demo)
set -euo pipefail
OUT=${OUT:-runs/demo-simclr}
EPOCHS=${EPOCHS:-20}
DATA=builtin:animal-mnist

# Short-run SimCLR on 32-px silhouettes (README, "Benchmarks"): random resized crops of 50-100% instead
# of the paper's 8-100%. A crop of 8% of a 28-px silhouette is a few pixels of edge, and the encoder
# learns little about the animal from matching it.
# --overwrite: the demo replaces its own previous run folder.
cvfm pretrain --data "$DATA" --split train --method simclr --model cvfm/tiny-resnet --epochs "$EPOCHS" \
  --opt min_scale=0.5 --output "$OUT" --overwrite >/dev/null

rm -f "$OUT/results.jsonl"
for model in cvfm/pixels cvfm/tiny-resnet "$OUT"; do
  cvfm evaluate knn "$model" --data "$DATA" --output "$OUT/results.jsonl"
  cvfm evaluate linear "$model" --data "$DATA" --output "$OUT/results.jsonl"
done
python examples/results_table.py "$OUT/results.jsonl"
