#!/usr/bin/env bash
# BLIP CapFilt on built-in pairs: fine-tune the tiny captioner and filter on clean captioned Animal-MNIST,
# then caption a few test images and filter a noisy copy of the test pairs (30% of the captions have the
# class or colour swapped). `python benchmarks/capfilt.py` scores the result.
#   EPOCHS=30 OUT=runs/capfilt bash examples/capfilt.sh
set -euo pipefail
OUT=${OUT:-runs/capfilt}
EPOCHS=${EPOCHS:-15}  # the filter gets twice as many: its ITM head needs them
DATA=builtin:animal-captions
mkdir -p "$OUT"

cvfm pretrain --data "$DATA" --split train --method blip-filter --epochs $((2 * EPOCHS)) -o "$OUT/filter" --overwrite
cvfm pretrain --data "$DATA" --split train --method blip-captioner --epochs "$EPOCHS" -o "$OUT/captioner" --overwrite

# Noisy pairs: test images written to $OUT/pairs with their captions, 30% corrupted.
python - "$OUT/pairs" <<'PY'
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "benchmarks")
from capfilt import write_pairs  # noqa: E402

manifest, truth = write_pairs(Path(sys.argv[1]), n=200, share=0.3, seed=0)
print(f"{manifest}: {len(truth)} pairs, {sum(t['corrupted'] for t in truth.values())} corrupted", file=sys.stderr)
PY

# Captions of five test images (beam search), then CapFilt on all pairs (resumable; rerunning is a no-op).
(cd "$OUT/pairs" && head -5 pairs.jsonl | cvfm caption ../captioner --data - --prompt "a picture of" -o -)
rm -f "$OUT/filtered.jsonl" "$OUT/filtered.rejects.jsonl" "$OUT/filtered.capfilt.json"
(cd "$OUT/pairs" && cvfm capfilt --in pairs.jsonl --out ../filtered.jsonl \
  --captioner ../captioner --matcher ../filter --num-captions 3 --threshold 0.3)
head -2 "$OUT/filtered.jsonl"
