"""Print `cvfm evaluate` JSON lines as a model x (k-NN, linear) table of top-1 accuracy (%)."""

import json
import sys

rows: dict[str, dict[str, float]] = {}
with open(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin", encoding="utf-8") as f:
    for line in f:
        r = json.loads(line)
        key = "knn_top1@20" if r["task"] == "knn" else "linear_top1"
        rows.setdefault(r["model"], {})[r["task"]] = 100 * r["metrics"][key]
names = {"cvfm/pixels": "raw pixels", "cvfm/tiny-resnet": "random-init cvfm/tiny-resnet"}
print(f"{'encoder':<40} {'k-NN top-1':>10} {'linear top-1':>12}")
for model, m in rows.items():
    knn, linear = m.get("knn", float("nan")), m.get("linear", float("nan"))
    print(f"{names.get(model, model):<40} {knn:>10.1f} {linear:>12.1f}")
