#!/usr/bin/env bash
# Unlearning tour on Animal-MNIST: train a classifier, erase 200 images exactly (recorded in a
# ledger), forget the class "cat" approximately with SalUn, audit it against exact retraining, list the
# ledger, and train a new model that leaves every forgotten id out. About 6 minutes on 2 CPU cores.
#
#   bash examples/unlearn.sh              # EPOCHS=10
#   EPOCHS=1 bash examples/unlearn.sh     # a smoke run
set -euo pipefail
export HF_HUB_OFFLINE=1
EPOCHS=${EPOCHS:-10}
OUT=${OUT:-runs/unlearn-tour}
DATA=builtin:animal-mnist
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1. a classifier (cvfm/tiny-resnet, $EPOCHS epochs)" >&2
cvfm finetune --data "$DATA" --split train --epochs "$EPOCHS" -o "$OUT/clf"

echo "== 2. an erasure request (every 40th training image): exact retraining, recorded in the ledger" >&2
python -c "
from cvfm.data.sources import open_source
print('\n'.join(it.id for it in open_source('$DATA', split='train').items[::40]))" > "$OUT/erase.txt"
cvfm unlearn --model "$OUT/clf" --forget "$OUT/erase.txt" --ledger "$OUT/ledger.jsonl" \
  --request-id ticket-1 -o "$OUT/erased"
echo "== the same request again: already in the ledger, nothing is recomputed" >&2
cvfm unlearn --model "$OUT/clf" --forget "$OUT/erase.txt" --ledger "$OUT/ledger.jsonl" \
  --request-id ticket-1 -o "$OUT/erased-again" > /dev/null

echo "== 3. forget the class 'cat': SalUn (approximate) and retrain (the exact reference)" >&2
cvfm unlearn --model "$OUT/clf" --forget-class cat --method salun --opt lr=0.04 -o "$OUT/no-cat-salun"
cvfm unlearn --model "$OUT/clf" --forget-class cat --method retrain --no-audit -o "$OUT/no-cat-retrain"
cvfm evaluate unlearning "$OUT/no-cat-salun" --data "$DATA" --forget-class cat \
  --reference "$OUT/no-cat-retrain" --plot "$OUT/no-cat-salun.png" --output "$OUT/audit.jsonl"
python - "$OUT/audit.jsonl" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
m, ref, gap = r["metrics"], r["reference"], r["gap"]
print(f"{'':12s} {'UA':>6s} {'RA':>6s} {'TA':>6s} {'MIA':>6s}", file=sys.stderr)
for name, x in (("before", r["before"]), ("salun", m), ("retrain", ref)):
    print(f"{name:12s} " + " ".join(f"{100 * x[k]:6.1f}" for k in ("ua", "ra", "ta", "mia_efficacy")), file=sys.stderr)
print(f"guarantee: {r['guarantee']}; average gap to retrain: {gap['avg_gap']:.2f} points", file=sys.stderr)
EOF

echo "== 4. the ledger, and a new model trained without every forgotten id" >&2
cvfm unlearn ledger "$OUT/ledger.jsonl"
cvfm finetune --data "$DATA" --split train --epochs 1 --ledger "$OUT/ledger.jsonl" -o "$OUT/clf-v2"
