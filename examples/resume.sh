#!/usr/bin/env bash
# Interrupt a run (Ctrl-C, or SIGTERM from a scheduler) and continue it: the result is the same as an uninterrupted run.
set -euo pipefail
OUT=${OUT:-runs/resume}
cvfm pretrain --data builtin:digits --split train --method dino --opt local_crops=2 --epochs 4 \
  --checkpoint-every 20 --output "$OUT" --overwrite &
pid=$!
sleep 20; kill -TERM "$pid" || true; wait "$pid" || true
python -c "import json,sys; print('status after interrupt:', json.load(open(sys.argv[1]))['status'])" "$OUT/run.json"
cvfm pretrain --data builtin:digits --output "$OUT" --resume
