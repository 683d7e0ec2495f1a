"""Unlearning on a built-in set: every method against exact retraining, per seed, on two requests.

For each seed: fine-tune a small classifier (`cvfm finetune`), then carry out two forget requests with
`cvfm unlearn` — 10% of the training items drawn at random, and one whole class — by `retrain` (the
exact reference) and by each approximate method. Each result is audited (UA, RA, TA, MIA-efficacy) and
compared with the retrained model of the same seed and request (the gap, in points, averaged over the
four metrics: SalUn's "Avg. Gap"); its wall time is divided by retraining's. Printed as a table of
means (± std over seeds); every run's record goes to `<out>/results.jsonl`.

Targets (issue 5): the best approximate method within an average gap of 2 points of retraining at no
more than 10% of its time; class forgetting UA >= 99% with RA down by no more than 2 points.

    python benchmarks/unlearn.py                  # 3 seeds, ~40 minutes on 2 CPU cores
    python benchmarks/unlearn.py --quick          # one seed, short training: a smoke run
    python benchmarks/unlearn.py --reuse --methods salun --opt salun:lr=0.1   # other settings, same originals
    python benchmarks/unlearn.py --summarise runs/bench-unlearn/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:  # run as a script: import the installed cvfm
    sys.path.pop(0)

import numpy as np  # noqa: E402

APPROXIMATE = ("finetune", "neggrad+", "random-label", "l1-sparse", "salun", "scrub")
METRICS = ("ua", "ra", "ta", "mia_efficacy")


def train_original(args, seed: int, out: Path) -> Path:
    from cvfm.finetune import FinetuneConfig, finetune

    if (out / "classifier").is_dir() and args.reuse:
        return out
    t0 = time.perf_counter()
    finetune(
        FinetuneConfig(
            data=args.data,
            split="train",
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=seed,
            num_workers=args.workers,
            output=str(out),
            overwrite=True,
        )
    )
    print(f"seed {seed}: original classifier in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def requests(args, seed: int, folder: Path) -> dict:
    """The two forget requests of this seed: 10% of the training ids at random, and one class."""
    from cvfm.data.sources import open_source
    from cvfm.unlearn.request import ForgetRequest

    source = open_source(args.data, split="train")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(source), size=round(args.fraction * len(source)), replace=False)
    ids_file = folder / "forget_random.txt"
    ids_file.write_text("".join(f"{source.items[i].id}\n" for i in sorted(chosen)))
    return {
        f"random{round(100 * args.fraction)}": ForgetRequest(ids_file=str(ids_file)),
        f"class:{args.forget_class}": ForgetRequest(classes=(args.forget_class,)),
    }


def run_one(model: Path, request, method: str, out: Path, args, seed: int) -> dict:
    from cvfm.unlearn.run import UnlearnConfig, unlearn

    return unlearn(
        UnlearnConfig(
            model=str(model),
            output=str(out),
            request=request,
            method=method,
            options=method_options(args.opt, method),
            seed=seed,
            num_workers=args.workers,
            overwrite=True,
        )
    )


def reuse(folder: Path) -> dict | None:
    """The record of an earlier audited run in `folder` (its unlearn.json), if there is one."""
    path = folder / "unlearn.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record and "audit" in record else None


def method_options(pairs: list[str], method: str) -> dict[str, str]:
    """`--opt salun:lr=0.1` style overrides that apply to `method`."""
    out = {}
    for pair in pairs:
        name, _, option = pair.partition(":")
        key, sep, value = option.partition("=")
        if not sep:
            raise SystemExit(f"--opt expects METHOD:KEY=VALUE, got '{pair}'")
        if name == method:
            out[key] = value
    return out


def with_baseline(rows: list[dict]) -> list[dict]:
    """Prepend, per seed and request, the original model itself ("none"): how far from retraining one
    is without unlearning at all, the gap every method has to beat."""
    from cvfm.unlearn.audit import gaps

    baseline = [
        {
            **r,
            "method": "none (original)",
            "after": r["before"],
            "avg_gap": gaps(r["before"], r["reference"])["avg_gap"],
            "wall_s": 0.0,
            "time_ratio": 0.0,
        }
        for r in rows
        if r["method"] == "retrain"
    ]
    return baseline + rows


def summarise(rows: list[dict]) -> tuple[str, dict[str, list[dict]]]:
    """A markdown table of means (± std over seeds), and per request the mean figures of each method."""
    rows = with_baseline(rows)
    lines = [
        "| request | method | UA | RA | TA | MIA-eff. | avg gap | time / retrain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    means: dict[str, list[dict]] = {}
    for request in dict.fromkeys(r["request"] for r in rows):
        group = [r for r in rows if r["request"] == request]
        for method in dict.fromkeys(r["method"] for r in group):
            runs = [r for r in group if r["method"] == method]
            gap = [r["avg_gap"] for r in runs]
            ratio = [r["time_ratio"] for r in runs]
            lines.append(
                f"| {request} | {method} | "
                + " | ".join(_cell([r["after"][m] for r in runs]) for m in METRICS)
                + f" | {_cell(gap, 1.0, '{:.2f}')} | {_cell(ratio, 1.0, '{:.3f}')} |"
            )
            means.setdefault(request, []).append(
                {
                    "method": method,
                    "avg_gap": statistics.mean(gap),
                    "time_ratio": statistics.mean(ratio),
                    "ua": statistics.mean(r["after"]["ua"] for r in runs),
                    "ra_drop": statistics.mean(r["before"]["ra"] - r["after"]["ra"] for r in runs),
                }
            )
    return "\n".join(lines), means


def _cell(values, scale=100.0, fmt="{:.1f}") -> str:
    values = [scale * v for v in values]
    spread = f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else ""
    return fmt.format(statistics.mean(values)) + spread


def verdicts(means: dict[str, list[dict]]) -> list[str]:
    """The issue's targets, per request: the best approximate method within 10% of retraining's time
    (and how far the original model itself is); for class requests, who reaches UA >= 99% with RA down
    by at most 2 points."""
    out = []
    for request, methods in means.items():
        baseline = next(m for m in methods if m["method"] == "none (original)")
        fast = [
            m
            for m in methods
            if m["method"] not in ("retrain", "none (original)") and m["time_ratio"] <= 0.10
        ]
        if not fast:
            out.append(f"{request}: no approximate method ran within 10% of retraining's time")
            continue
        best = min(fast, key=lambda m: m["avg_gap"])
        out.append(
            f"{request}: best approximate method within 10% of retrain's time: {best['method']} (avg gap "
            f"{best['avg_gap']:.2f} points, {100 * best['time_ratio']:.1f}% of the time; the original model, "
            f"unlearning nothing, is {baseline['avg_gap']:.2f} points away)"
        )
        if request.startswith("class:"):
            ok = [m for m in fast if m["ua"] >= 0.99 and m["ra_drop"] <= 0.02]
            names = ", ".join(
                f"{m['method']} (UA {100 * m['ua']:.1f}%, RA down {100 * m['ra_drop']:.2f})" for m in ok
            )
            out.append(
                f"{request}: UA >= 99% with RA down <= 2 points within 10% of the time: {names or 'none'}"
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="builtin:animal-mnist")
    p.add_argument("--model", default="cvfm/tiny-resnet")
    p.add_argument("--epochs", type=int, default=30, help="training length of the original and of retrain")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fraction", type=float, default=0.1, help="share forgotten by the random request")
    p.add_argument("--forget-class", default="cat")
    p.add_argument("--methods", nargs="+", default=list(APPROXIMATE))
    p.add_argument(
        "--opt",
        nargs="*",
        default=[],
        help="method options, e.g. salun:lr=0.1 salun:epochs=3 (default: published)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/bench-unlearn")
    p.add_argument(
        "--reuse", action="store_true", help="reuse the originals and retrained references found in --out"
    )
    p.add_argument("--results", help="results file (default: <out>/results.jsonl)")
    p.add_argument("--quick", action="store_true", help="one seed, 4 epochs: a smoke run")
    p.add_argument("--summarise", metavar="RESULTS", help="print the table of an earlier results.jsonl")
    args = p.parse_args()
    if args.summarise:
        with open(args.summarise) as f:
            report([json.loads(line) for line in f if line.strip()])
        return
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 4
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    from cvfm.unlearn.audit import gaps

    rows = []
    results = Path(args.results) if args.results else root / "results.jsonl"
    results.write_text("")
    for seed in args.seeds:
        folder = root / f"seed{seed}"
        folder.mkdir(exist_ok=True)
        original = train_original(args, seed, folder / "original")
        for name, request in requests(args, seed, folder).items():
            tag = name.replace(":", "-")
            reference = reuse(folder / f"{tag}-retrain") if args.reuse else None
            reference = reference or run_one(
                original, request, "retrain", folder / f"{tag}-retrain", args, seed
            )
            for method in ("retrain", *args.methods):
                rec = reference if method == "retrain" else None
                if rec is None:
                    rec = run_one(original, request, method, folder / f"{tag}-{method}", args, seed)
                after, before = rec["audit"]["after"], rec["audit"]["before"]
                row = {
                    "seed": seed,
                    "request": name,
                    "method": method,
                    "after": after,
                    "before": before,
                    "reference": reference["audit"]["after"],
                    "avg_gap": gaps(after, reference["audit"]["after"])["avg_gap"],
                    "wall_s": rec["wall_s"],
                    "time_ratio": rec["wall_s"] / reference["wall_s"],
                    "settings": {k: v for k, v in rec["settings"].items() if k != "logs"},
                }
                rows.append(row)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"seed {seed} {name} {method}: UA {100 * after['ua']:.1f} RA {100 * after['ra']:.1f} "
                    f"TA {100 * after['ta']:.1f} MIA {100 * after['mia_efficacy']:.1f} "
                    f"gap {row['avg_gap']:.2f} time {row['time_ratio']:.3f}x",
                    file=sys.stderr,
                )
    report(rows)


def report(rows: list[dict]) -> None:
    table, means = summarise(rows)
    print(table)
    print()
    print("\n".join(verdicts(means)))


if __name__ == "__main__":
    main()
