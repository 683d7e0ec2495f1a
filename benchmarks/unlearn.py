"""Unlearning on Animal-MNIST: each approximate method against exact retraining, its learning rate
chosen on a validation split, its figures reported on the test split, over seeds.

Data. Animal-MNIST's fixed split (8,000 train / 2,000 test) is written once as PNGs with a JSONL
manifest. 10% of the training split (800 images, stratified by class, seed 0) is held out as the
validation split and never trained on. Two settings:
- standard: the other 7,200 images, augmentation, 10 epochs, batch 128. The tiny model barely
  memorises (its train and test top-1 are close), so forgetting a random 10% leaves little to undo: this
  setting forgets the class `cat`;
- memorising: 1,000 of them (100 per class, seed 0), no augmentation, 30 epochs, batch 64. The
  original fits its training set and stays well below that on test (the gap is printed).

For each setting and seed: fine-tune the original (`cvfm finetune`); then for each forget request
(standard: the class `cat`; memorising: 10% of the training items at random), run
`retrain` (the exact reference) and each approximate method at its published learning rate times each
of `--lr-grid` (1, 4). Every model is audited twice: with the validation split in place of the test
split, and with the test split. A method's learning rate is chosen per setting and request as the one
whose average gap to retraining (SalUn's "Avg. Gap" over UA, RA, TA and MIA-efficacy) on validation is
lowest, averaged over seeds; the test split plays no part in the choice. The table gives test figures,
mean ± std over seeds, of the published and the chosen rate, beside "none": the original itself,
unlearning nothing. Times are of the whole `unlearn(...)` call (opening the model and data, the check
of the data, unlearning, saving), the same for every method, retrain included, from the same original,
divided by retrain's: CPU time (this process and its DataLoader workers), which other jobs on a shared
machine do not inflate, and wall time. Every run's record goes to `<out>/results.jsonl`.

Targets (issue 5): the best approximate method within an average gap of 2 points of retraining at no
more than 10% of its (CPU) time; class forgetting UA >= 99% with RA down by no more than 2 points.

    python benchmarks/unlearn.py                  # 3 seeds
    python benchmarks/unlearn.py --quick          # one seed, short training, one rate: a smoke run
    python benchmarks/unlearn.py --reuse          # go on after an interruption: keeps the models made
    python benchmarks/unlearn.py --summarise runs/bench-unlearn/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:  # run as a script: import the installed cvfm
    sys.path.pop(0)

import numpy as np  # noqa: E402

APPROXIMATE = ("finetune", "neggrad+", "random-label", "l1-sparse", "salun", "scrub")
METRICS = ("ua", "ra", "ta", "mia_efficacy")
VAL_FRACTION, SPLIT_SEED = 0.1, 0


@dataclass(frozen=True)
class Setting:
    name: str
    train_per_class: int | None  # None: every training image not held out for validation
    augment: bool
    epochs: int
    batch_size: int
    requests: tuple[str, ...]  # "random" and/or "class"


SETTINGS = {
    "standard": Setting("standard", None, True, 10, 128, ("class",)),
    "memorising": Setting("memorising", 100, False, 30, 64, ("random",)),
}


def write_data(root: Path, settings: list[Setting]) -> dict[str, Path]:
    """Animal-MNIST as PNGs and one manifest per setting (splits train / val / test; the images a
    setting does not train on are in no split). Returns setting name -> manifest."""
    from PIL import Image

    from cvfm.data.builtin import _animal_mnist, split_indices

    pixels, labels, classes = _animal_mnist()
    train, test = split_indices(labels, "train"), split_indices(labels, "test")
    rng = np.random.default_rng(SPLIT_SEED)
    by_class = [rng.permutation(train[labels[train] == c]) for c in range(len(classes))]
    val = {int(i) for members in by_class for i in members[: round(VAL_FRACTION * len(members))]}
    rest = [[int(i) for i in members if int(i) not in val] for members in by_class]
    images = root / "png"
    if not images.is_dir():
        (tmp := root / ".png.tmp").mkdir(parents=True, exist_ok=True)
        for i in range(len(labels)):
            Image.fromarray(pixels[i]).save(tmp / f"{i}.png")
        tmp.rename(images)
    manifests = {}
    for s in settings:
        trained = {i for members in rest for i in members[: s.train_per_class]}
        split = {int(i): "test" for i in test} | {i: "val" for i in val} | {i: "train" for i in trained}
        lines = [
            json.dumps(
                {"id": f"animal-mnist/{i}", "image": f"png/{i}.png", "label": classes[labels[i]], "split": sp}
            )
            + "\n"
            for i, sp in sorted(split.items())
        ]
        manifests[s.name] = root / f"{s.name}.jsonl"
        manifests[s.name].write_text("".join(lines))
    return manifests


def train_original(data: Path, s: Setting, args, seed: int, out: Path) -> bool:
    """Fine-tune the original classifier into `out`; with --reuse, keep one trained by the same recipe
    there. Returns whether it was (re)trained."""
    from cvfm.finetune import FinetuneConfig, finetune, recipe

    cfg = FinetuneConfig(
        data=str(data), split="train", model=args.model, epochs=args.epochs or s.epochs,
        batch_size=s.batch_size, augment=s.augment, seed=seed, num_workers=args.workers,
        output=str(out), overwrite=True,
    )  # fmt: skip
    run_json = out / "run.json"
    trained = args.reuse and (out / "classifier").is_dir() and run_json.is_file()
    if trained and json.loads(run_json.read_text()).get("finetune") == recipe(cfg):
        return False
    t0 = time.perf_counter()
    finetune(cfg)
    log(f"{s.name} seed {seed}: original classifier in {time.perf_counter() - t0:.0f} s")
    return True


def requests(data: Path, s: Setting, args, seed: int, folder: Path) -> dict:
    """This seed's forget requests: `--fraction` of the training ids at random, and the class."""
    from cvfm.data.sources import open_source
    from cvfm.unlearn.request import ForgetRequest

    source = open_source(str(data), split="train")
    chosen = np.random.default_rng(seed).choice(
        len(source), size=round(args.fraction * len(source)), replace=False
    )
    ids_file = folder / "forget_random.txt"
    ids_file.write_text("".join(f"{source.items[i].id}\n" for i in sorted(chosen)))
    made = {
        "random": (f"random {round(100 * args.fraction)}%", ForgetRequest(ids_file=str(ids_file))),
        "class": (f"class {args.forget_class}", ForgetRequest(classes=(args.forget_class,))),
    }
    return dict(made[k] for k in s.requests)


def timed_unlearn(model: Path, request, method: str, out: Path, options: dict, args, seed: int) -> dict:
    """Wall and CPU seconds (this process and its DataLoader workers) of one whole `unlearn(...)` call,
    without its audit (every model is audited alike here)."""
    from cvfm.unlearn.run import UnlearnConfig, unlearn

    t0, c0 = time.perf_counter(), cpu_seconds()
    unlearn(
        UnlearnConfig(
            model=str(model), output=str(out), request=request, method=method, options=options,
            seed=seed, num_workers=args.workers, audit=False, overwrite=True,
        )
    )  # fmt: skip
    return {"wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(cpu_seconds() - c0, 3)}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (DataLoader workers): the
    work done, which other jobs on a shared machine do not inflate as they do wall time."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Auditor:
    """Audits models of one request on validation and on test (the same retain / forget sets)."""

    def __init__(self, data: Path, request, workers: int, seed: int):
        from cvfm.data.sources import open_source

        train = open_source(str(data), split="train")
        self.retain, self.forget = request.split(train)
        self.splits = {
            name: request.split_test(open_source(str(data), split=name), train) for name in ("val", "test")
        }
        self.workers, self.seed = workers, seed

    def __call__(self, folder: Path) -> dict[str, dict]:
        from cvfm.registry import create_classifier
        from cvfm.unlearn.audit import audit_splits

        model = create_classifier(str(folder))
        audits = audit_splits(
            model, retain=self.retain, forget=self.forget, splits=self.splits,
            transform=model.preprocess.transform(), num_workers=self.workers, seed=self.seed,
        )  # fmt: skip
        return {name: dict(metrics) for name, metrics in audits.items()}


def run(args) -> list[dict]:
    from cvfm.unlearn.methods import build_unlearn_method

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    settings = [SETTINGS[name] for name in args.settings]
    manifests = write_data(root / "data", settings)
    results = Path(args.results) if args.results else root / "results.jsonl"
    # --reuse keeps the models unlearned before and their times (measured when they ran); every model
    # is audited again, so the records follow the current audit
    done = {_key(r): r for r in _read(results)} if args.reuse and results.is_file() else {}
    results.write_text("")
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")

    for s in settings:
        for seed in args.seeds:
            folder = root / s.name / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            original = folder / "original"
            if train_original(manifests[s.name], s, args, seed, original):
                done = {k: r for k, r in done.items() if k[:2] != (s.name, seed)}  # made from another
            train_top1 = json.loads((original / "run.json").read_text())["train_top1"]
            for request, forget in requests(manifests[s.name], s, args, seed, folder).items():
                auditor = Auditor(manifests[s.name], forget, args.workers, seed)
                base = {"setting": s.name, "seed": seed, "request": request, "train_top1": train_top1}
                tag = request.replace(" ", "-").replace("%", "")
                runs = [("none", None), ("retrain", None)]
                runs += [(m, x) for m in args.methods for x in args.lr_grid]
                for method, mult in runs:
                    row = {**base, "method": method, "multiplier": mult}
                    options, lr = {}, None
                    if mult is not None:
                        lr = build_unlearn_method(method).cfg.lr * mult
                        options = {"lr": repr(lr)}
                    out = folder / (f"{tag}-{method}" + (f"-x{mult:g}" if mult is not None else ""))
                    earlier = done.get(_key(row))
                    if method == "none":
                        times, out = {"wall_s": 0.0, "cpu_s": 0.0}, original
                    elif earlier is not None and (out / "unlearn.json").is_file():
                        times = {k: earlier[k] for k in ("wall_s", "cpu_s")}
                    else:
                        times = timed_unlearn(original, forget, method, out, options, args, seed)
                    row.update(lr=lr, **times, **auditor(out))
                    record(row)
                    t = row["test"]
                    log(
                        f"{s.name} seed {seed} {request} {method}"
                        + (f" x{mult:g}" if mult is not None else "")
                        + f": UA {100 * t['ua']:.1f} RA {100 * t['ra']:.1f} TA {100 * t['ta']:.1f} "
                        f"MIA {100 * t['mia_efficacy']:.1f} in {times['wall_s']:.1f} s "
                        f"({times['cpu_s']:.1f} s CPU)"
                    )
    return rows


def _key(row: dict) -> tuple:
    return row["setting"], row["seed"], row["request"], row["method"], row["multiplier"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def with_gaps(rows: list[dict]) -> list[dict]:
    """Each row with its average gap to the retrained model of the same setting, seed and request, on
    validation and on test, its time over retrain's, and its retain accuracy below the original's."""
    from cvfm.unlearn.audit import gaps

    def by_run(method: str) -> dict[tuple, dict]:
        return {(r["setting"], r["seed"], r["request"]): r for r in rows if r["method"] == method}

    reference, original = by_run("retrain"), by_run("none")
    out = []
    for r in rows:
        run = (r["setting"], r["seed"], r["request"])
        ref = reference.get(run)
        if ref is None:  # an unfinished run (a report made while the benchmark runs)
            continue
        out.append(
            {
                **r,
                "gap_val": gaps(r["val"], ref["val"])["avg_gap"],
                "gap_test": gaps(r["test"], ref["test"])["avg_gap"],
                "time_ratio": r["cpu_s"] / ref["cpu_s"],
                "wall_ratio": r["wall_s"] / ref["wall_s"],
                "ra_drop": original[run]["test"]["ra"] - r["test"]["ra"],
            }
        )
    return out


def chosen_rates(rows: list[dict]) -> dict[tuple, float]:
    """(setting, request, method) -> the multiplier with the lowest mean validation gap over seeds,
    among those run on every seed (ties: the lower rate)."""
    gaps: dict[tuple, dict[float, dict[int, float]]] = {}
    for r in rows:
        if r["multiplier"] is not None:
            runs = gaps.setdefault((r["setting"], r["request"], r["method"]), {})
            runs.setdefault(r["multiplier"], {})[r["seed"]] = r["gap_val"]
    chosen = {}
    for key, by_mult in gaps.items():
        seeds = {r["seed"] for r in rows if (r["setting"], r["request"]) == key[:2]}
        full = {m: v for m, v in by_mult.items() if set(v) == seeds}
        if full:  # else: not run on every seed yet (a report made while the benchmark runs)
            chosen[key] = min(full, key=lambda m: (statistics.mean(full[m].values()), m))
    return chosen


def summarise(rows: list[dict]) -> list[str]:
    """The report: the originals' train-test gap, a table per setting, and the verdicts."""
    rows = with_gaps(rows)
    chosen = chosen_rates(rows)
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        seeds = sorted({r["seed"] for r in mine})
        # the original's test top-1 over every class comes from a random request (a class request's TA
        # leaves the forgotten class out)
        nones = [r for r in mine if r["method"] == "none"]
        train = [r["train_top1"] for r in nones if r["request"] == nones[0]["request"]]
        test = [r["test"]["ta"] for r in nones if r["request"].startswith("random")]
        tested = f", test top-1 {_cell(test)}, gap {_cell(np.subtract(train, test))} points" if test else ""
        retrain = [r for r in mine if r["method"] == "retrain"]
        lines += [
            f"## {setting} (seeds {', '.join(map(str, seeds))})",
            "",
            f"original: train top-1 {_cell(train)}{tested}; "
            f"retrain takes {_cell([r['wall_s'] for r in retrain], 1.0, '{:.0f}')} s "
            f"({_cell([r['cpu_s'] for r in retrain], 1.0, '{:.0f}')} s of CPU)",
            "",
            "| request | method | lr (× published) | UA | RA | TA | MIA-eff. | avg gap, test | avg gap, val "
            "| CPU time / retrain | wall time / retrain |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for request in dict.fromkeys(r["request"] for r in mine):
            group = [r for r in mine if r["request"] == request]
            for method, mult, label in _table_rows(group, chosen, setting, request):
                runs = [r for r in group if r["method"] == method and r["multiplier"] == mult]
                lines.append(
                    f"| {request} | {method} | {label} | "
                    + " | ".join(_cell([r["test"][m] for r in runs]) for m in METRICS)
                    + f" | {_cell([r['gap_test'] for r in runs], 1.0, '{:.2f}')}"
                    + f" | {_cell([r['gap_val'] for r in runs], 1.0, '{:.2f}')}"
                    + f" | {_cell([r['time_ratio'] for r in runs], 1.0, '{:.3f}')}"
                    + f" | {_cell([r['wall_ratio'] for r in runs], 1.0, '{:.3f}')} |"
                )
        lines += ["", *selection(mine), "", *verdicts(mine, chosen, setting), ""]
    return lines


def selection(rows: list[dict]) -> list[str]:
    """The table the rates were chosen from: each method's mean validation gap at each rate."""
    mults = sorted({r["multiplier"] for r in rows if r["multiplier"] is not None})
    lines = [
        "avg gap to retrain on validation (the choice), mean over seeds:",
        "",
        "| request | method | " + " | ".join(f"×{m:g}" for m in mults) + " |",
        "|---|---|" + "---|" * len(mults),
    ]
    for request in dict.fromkeys(r["request"] for r in rows):
        group = [r for r in rows if r["request"] == request]
        for method in dict.fromkeys(r["method"] for r in group if r["multiplier"] is not None):
            cells = [_cell([r["gap_val"] for r in group if r["method"] == method and r["multiplier"] == m],
                           1.0, "{:.2f}") for m in mults]  # fmt: skip
            lines.append(f"| {request} | {method} | " + " | ".join(cells) + " |")
    return lines


def _table_rows(group: list[dict], chosen: dict, setting: str, request: str):
    """(method, multiplier, lr label) per table row: none, retrain, then each method at the published
    rate and, when validation chose another, at the chosen one."""
    yield "none", None, "-"
    yield "retrain", None, "-"
    for method in dict.fromkeys(r["method"] for r in group if r["multiplier"] is not None):
        pick = chosen.get((setting, request, method), 1)  # none yet: not run on every seed
        lr = next(r["lr"] for r in group if r["method"] == method and r["multiplier"] == 1)
        if 1 in {r["multiplier"] for r in group if r["method"] == method}:
            yield method, 1, f"{lr:g} (×1)" + (" chosen" if pick == 1 else "")
        if pick != 1:
            yield method, pick, f"{lr * pick:g} (×{pick:g}) chosen"


def verdicts(rows: list[dict], chosen: dict, setting: str) -> list[str]:
    """The targets, per request, on the test figures of the rates chosen on validation."""
    out = []
    for request in dict.fromkeys(r["request"] for r in rows):
        group = [r for r in rows if r["request"] == request]
        approximate = dict.fromkeys(r["method"] for r in group if r["multiplier"] is not None)
        picks = [(m, chosen[(setting, request, m)]) for m in approximate if (setting, request, m) in chosen]
        fast = [(m, x) for m, x in picks if _mean(group, m, x, "time_ratio") <= 0.10]
        if not fast:
            out.append(f"- {request}: no approximate method ran within 10% of retraining's CPU time")
            continue
        m, x = min(fast, key=lambda p: _mean(group, *p, "gap_test"))
        gap = _mean(group, m, x, "gap_test")
        out.append(
            f"- {request}: best approximate method within 10% of retrain's CPU time, at the rate chosen on "
            f"validation: {m} (×{x:g}), avg gap {gap:.2f} points on test at "
            f"{100 * _mean(group, m, x, 'time_ratio'):.1f}% of the time; the original, unlearning nothing, "
            f"is {_mean(group, 'none', None, 'gap_test'):.2f} points away; target (gap <= 2): "
            + ("met" if gap <= 2 else "not met")
        )
        if request.startswith("class"):
            ok = [
                f"{m} ×{x:g} (UA {100 * _mean(group, m, x, 'ua'):.1f}%, "
                f"RA down {100 * _mean(group, m, x, 'ra_drop'):.2f})"
                for m, x in fast
                if _mean(group, m, x, "ua") >= 0.99 and _mean(group, m, x, "ra_drop") <= 0.02
            ]
            out.append(
                f"- {request}: UA >= 99% with RA down <= 2 points within 10% of the time, at the chosen "
                f"rates: {', '.join(ok) or 'none'}"
            )
    return out


def _mean(group: list[dict], method: str, mult: float | None, key: str) -> float:
    """Mean over seeds of `key` (a row field, or a test metric) for `method` at `mult`."""
    runs = [r for r in group if r["method"] == method and r["multiplier"] == mult]
    return statistics.mean(r[key] if key in r else r["test"][key] for r in runs)


def _cell(values, scale=100.0, fmt="{:.1f}") -> str:
    values = [scale * v for v in values]
    if not values:
        return "-"
    spread = f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else ""
    return fmt.format(statistics.mean(values)) + spread


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cvfm/tiny-resnet")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--epochs", type=int, help="original and retrain epochs (default: the setting's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fraction", type=float, default=0.1, help="share forgotten by the random request")
    p.add_argument("--forget-class", default="cat")
    p.add_argument("--methods", nargs="+", default=list(APPROXIMATE))
    p.add_argument("--lr-grid", type=float, nargs="+", default=[1.0, 4.0], help="× the published lr")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/bench-unlearn")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the originals, unlearned models and their times found in --out (audits are redone)",
    )
    p.add_argument("--results", help="results file (default: <out>/results.jsonl)")
    p.add_argument(
        "--quick", action="store_true", help="one seed, 4 epochs, the published rates: a smoke run"
    )
    p.add_argument("--summarise", metavar="RESULTS", nargs="+", help="print the report of results files")
    args = p.parse_args()
    if args.summarise:
        print("\n".join(summarise([row for path in args.summarise for row in _read(Path(path))])))
        return
    if args.quick:
        args.seeds, args.epochs, args.lr_grid = args.seeds[:1], 4, [1.0]
    t0 = time.perf_counter()
    rows = run(args)
    print("\n".join(summarise(rows)))
    print(f"benchmark wall time: {(time.perf_counter() - t0) / 60:.0f} min")


if __name__ == "__main__":
    main()
