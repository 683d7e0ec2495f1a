"""Distillation benchmark: a tiny student distilled from a larger DINO teacher against the same student
pre-trained from scratch with DINO for the same wall-clock time.

Run from the repository root with the venv active:

    HF_HUB_OFFLINE=1 python benchmarks/distill.py --quick     # smoke test on builtin:digits (minutes)
    HF_HUB_OFFLINE=1 python benchmarks/distill.py             # 20 minutes a seed on 2 idle cores (teacher 11)
    HF_HUB_OFFLINE=1 python benchmarks/distill.py --summarise runs/distill.jsonl --markdown

Protocol, per seed of --seeds (default 0), all on the train split of --data (builtin:animal-mnist), all
scored on its test split by `evaluate("knn" | "linear", ...)` as benchmarks/ssl.py scores (train split =
k-NN bank / probe training set):

1. teacher: --teacher (cvfm/small-resnet, 1.2M parameters) pre-trained from random init with
   `pretrain --method dino` for --teacher-epochs. Its wall time is reported but not part of the match:
   a distilled student is made from a teacher that already exists.
2. distilled: --student (cvfm/tiny-resnet, 0.3M) from random init, trained by `distill` from the teacher
   run (--loss, default feature: cosine to the teacher's pooled embedding and patch tokens, standardised per
   dimension) for --epochs. Its wall time W (setup, teacher forwards, training and export: the whole
   `distill` call) is the budget of step 4.
3. calibration: the student pre-trained from scratch with DINO for one epoch, timed. The loop has no time
   budget (and a cut-short cosine schedule would not be DINO's), so the epochs of step 4 are computed:
   round((W - overhead) / epoch seconds), at least 1, where epoch seconds = the epoch's images / its
   images/s and overhead = the rest of the calibration run's wall time.
4. from scratch: the student pre-trained with DINO for those epochs (the calibration run itself when that
   is one epoch). Both wall times are printed, so how close the match came is visible.
5. random init: the student's exact starting point (same seed), scored as is.
6. step speed (first seed only): one distillation step (teacher forward, student forward and backward,
   AdamW step) on a pre-made batch against the bound of its parts timed alone, the teacher's forward
   plus a student step with a trivial loss; medians of --steps after --warmup, alternating. No data
   loading here; the distillation run's own images/s (with it) is printed beside.

DINO runs (teacher, calibration, from scratch) use the 2 global crops only (--dino-local-crops 8 runs
cvfm's full recipe), as benchmarks/ssl.py does, and cvfm's default options otherwise. Targets, printed
and not asserted: the distilled student beats the from-scratch one by >= 3 k-NN points and comes within
3 points of its teacher.

Each finished run is appended to --results (JSONL) at once and its folder kept under --workdir; a re-run
skips the runs already there (a later step reads the teacher's folder and the distillation's wall time
from them), so an interrupted benchmark resumes, and --summarise FILE prints the tables from the file.
Everything runs with `torch.set_num_threads(--threads)` (default 1; see benchmarks/ssl.py).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This folder holds ssl.py (the SSL benchmark): keep it off the path, where it would shadow the ssl module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("ssl_benchmark", ROOT / "benchmarks" / "ssl.py")
ssl_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ssl_bench)
fmt_table, mean_std, say = ssl_bench.fmt_table, ssl_bench.mean_std, ssl_bench.say

ROLES = ("teacher", "distilled", "from scratch", "random init")


def params(model: str) -> int:
    from cvfm.registry import create_encoder

    return sum(p.numel() for p in create_encoder(model).parameters())


def timed(train) -> tuple[Path, float]:
    t0 = time.perf_counter()
    run = train()
    return run, time.perf_counter() - t0


def train_record(run: Path, wall: float) -> dict:
    """What a training run's folder says about its speed and length, with its wall time."""
    last = ssl_bench.last_epoch_record(run)
    info = json.loads((run / "run.json").read_text())
    images_per_s = last.get("images_per_s")
    epoch_images = info["resolved"]["steps_per_epoch"] * info["resolved"]["global_batch_size"]
    return {
        "model": str(run),
        "train_s": wall,
        "train_images_per_s": images_per_s,
        "epoch_s": epoch_images / images_per_s if images_per_s else None,
        "epochs": info["config"]["epochs"],
        "total_steps": info["resolved"]["total_steps"],
        "final_loss": last.get("epoch/loss"),
    }


TRAIN_KEYS = ("model", "train_s", "train_images_per_s", "epoch_s", "epochs", "total_steps", "final_loss")


def dino(model: str, epochs: int, out: Path, seed: int, args) -> dict:
    from cvfm.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        data=args.data,
        split="train",
        method="dino",
        model=model,
        epochs=epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        output=str(out),
        options=ssl_bench.method_options("dino", args),
        seed=seed,
        overwrite=True,  # only a run that did not reach the results file (cut short) is replaced
    )
    return train_record(*timed(lambda: pretrain(cfg)))


def distilled(teacher_run: str, out: Path, seed: int, args) -> dict:
    from cvfm.distill import DistillConfig, distill

    cfg = DistillConfig(
        data=args.data,
        split="train",
        teacher=teacher_run,
        student=args.student,
        losses=tuple(args.loss),
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        output=str(out),
        seed=seed,
        overwrite=True,
    )
    return train_record(*timed(lambda: distill(cfg)))


def matched_epochs(calibration: dict, budget_s: float) -> int:
    """DINO epochs whose wall time is closest to `budget_s`, from a timed one-epoch run."""
    overhead = calibration["train_s"] - calibration["epoch_s"]
    return max(1, round((budget_s - overhead) / calibration["epoch_s"]))


def config_of(args) -> dict:
    keys = ("data", "teacher", "student", "teacher_epochs", "epochs", "batch_size", "loss")
    return {**{k: getattr(args, k) for k in keys}, "dino_options": ssl_bench.method_options("dino", args)}


TEACHER_KEYS = ("data", "teacher", "teacher_epochs", "batch_size", "dino_options")


def teacher_config(config: dict) -> dict:
    """What the teacher run depends on: runs of other distillation settings share it."""
    return {k: config[k] for k in TEACHER_KEYS}


def _digest(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def benchmark(args, workdir: Path) -> list[dict]:
    """Steps 1-6 of the protocol for every seed; each finished run goes to args.results at once. Run
    folders are named by the configuration's digest: another configuration never overwrites them."""
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    config = config_of(args)
    teachers_dir = workdir / _digest(teacher_config(config))
    workdir = workdir / _digest(config)
    everything = ssl_bench.load_records(results, legacy={})
    records = [r for r in everything if r["config"] == config]
    records += [
        r
        for r in everything
        if r["role"] == "teacher"
        and r["config"] != config
        and teacher_config(r["config"]) == teacher_config(config)
    ]
    say(f"[distill] {len(records)} finished run(s) reused from {results}")

    def do(role: str, seed: int, train, *train_args) -> dict:
        """The record of `role` for `seed`: from the results file (a teacher of the same teacher settings),
        or `train(*train_args)` then scored."""
        found = [r for r in records if r["role"] == role and r["seed"] == seed]
        if found:
            return found[0]
        say(f"[distill] seed {seed}: {role} ...")
        record = {"config": config, "role": role, "seed": seed, **train(*train_args)}
        if role in ROLES:
            record.update(ssl_bench.score(record["model"], args.data, "test", seed, args))
            say(f"[distill]   k-NN {record['knn_top1']:.2f}  linear {record['linear_top1']:.2f}")
        record["versions"] = ssl_bench.versions()
        with results.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        records.append(record)
        return record

    for seed in args.seeds:
        teacher = do(
            "teacher",
            seed,
            dino,
            args.teacher,
            args.teacher_epochs,
            teachers_dir / f"teacher-{seed}",
            seed,
            args,
        )
        if not Path(teacher["model"], "backbone").is_dir():
            raise SystemExit(f"the teacher run {teacher['model']} is gone: delete its line in {results}")
        kd = do("distilled", seed, distilled, teacher["model"], workdir / f"distilled-{seed}", seed, args)
        calib = do("calibration", seed, dino, args.student, 1, workdir / f"calibration-{seed}", seed, args)
        epochs = matched_epochs(calib, kd["train_s"])
        if epochs == 1:  # the calibration run is the from-scratch run
            do("from scratch", seed, dict, {k: calib[k] for k in TRAIN_KEYS})
        else:
            do("from scratch", seed, dino, args.student, epochs, workdir / f"scratch-{seed}", seed, args)
        do("random init", seed, dict, {"model": args.student})
        if seed == args.seeds[0]:
            do("speed", seed, step_speed, teacher["model"], args, args.steps, args.warmup)
    return records


# ---------------------------------------------------------------------------------------- step speed


def step_speed(teacher_run: str, args, steps: int, warmup: int) -> dict:
    """Images/s of one distillation step (teacher forward, student forward and backward, AdamW step) on a
    pre-made batch, against the bound of its two parts timed alone: the teacher's forward, and a student
    step with a trivial loss (no teacher, no projector). Medians over `steps` after `warmup`."""
    from cvfm.distill import DistillConfig
    from cvfm.distill.method import Distill
    from cvfm.distill.teacher import load_teacher
    from cvfm.registry import create_encoder
    from cvfm.runtime.plan import Budget

    torch.manual_seed(0)
    cfg = DistillConfig(
        data="", output="", teacher=teacher_run, student=args.student, losses=tuple(args.loss)
    )
    student = create_encoder(args.student)
    teacher = load_teacher(teacher_run, cfg.losses, student.preprocess, None)
    b = args.batch_size
    method = Distill(student, cfg, Budget(b * steps, steps, steps + warmup, b), teacher).train()
    x = torch.randn(b, 3, student.preprocess.size, student.preprocess.size)
    opt = torch.optim.AdamW(method.param_groups(), lr=1e-4)
    alone = create_encoder(args.student).train()
    alone_opt = torch.optim.AdamW(alone.parameters(), lr=1e-4)

    def update(loss, optimizer):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = {
        "distill step": lambda i: update(method({"image": [x]}, i)[0], opt),
        "teacher forward": lambda i: teacher(x),
        "student step": lambda i: update(alone.encode(x).pooled.square().mean(), alone_opt),
    }
    times = {k: [] for k in parts}
    for i in range(warmup + steps):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "distill_step_images_per_s": b / med["distill step"],
        "bound_images_per_s": b / (med["teacher forward"] + med["student step"]),
        "median_ms": {k: 1000 * v for k, v in med.items()},
    }


# ------------------------------------------------------------------------------------------- summaries


def summary(records: list[dict], markdown: bool = False) -> str:
    """A table per benchmark configuration in `records`, and whether the targets are met."""
    parts = []
    students = {
        json.dumps(r["config"], sort_keys=True): r["config"] for r in records if r["role"] != "teacher"
    }
    shared = {json.dumps(teacher_config(c), sort_keys=True) for c in students.values()}
    lone = {
        json.dumps(r["config"], sort_keys=True): r["config"]
        for r in records
        if r["role"] == "teacher" and json.dumps(teacher_config(r["config"]), sort_keys=True) not in shared
    }
    for config in {**students, **lone}.values():
        mine = [r for r in records if r["config"] == config]
        if not any(r["role"] == "teacher" for r in mine):  # a teacher shared with other settings
            same = teacher_config(config)
            mine += [r for r in records if r["role"] == "teacher" and teacher_config(r["config"]) == same]
        by_role = {role: [r for r in mine if r["role"] == role] for role in (*ROLES, "calibration")}
        rows = []
        for role in ROLES:
            runs = by_role[role]
            if not runs:
                continue
            model = config["teacher"] if role == "teacher" else config["student"]
            pick = lambda k, runs=runs: [r[k] for r in runs if r.get(k) is not None]  # noqa: E731
            rows.append(
                [
                    role,
                    f"{model} ({params(model) / 1e6:.2f}M)",
                    ",".join(str(r["seed"]) for r in runs),
                    mean_std(pick("knn_top1")),
                    mean_std(pick("linear_top1")),
                    ",".join(str(e) for e in pick("epochs")) or "-",
                    mean_std(pick("train_s")),
                    mean_std(pick("train_images_per_s")),
                    mean_std(pick("effective_rank")),
                ]
            )
        headers = ["run", "model", "seeds", "k-NN@20 top-1 %", "linear top-1 %", "epochs", "train s"]
        headers += ["train img/s", "eff. rank"]
        title = (
            f"Distillation on {config['data']} (test split; mean ± std over seeds), batch "
            f"{config['batch_size']}: teacher DINO {config['teacher_epochs']} epochs; distilled "
            f"{config['epochs']} epochs with --loss {' --loss '.join(config['loss'])}; from scratch: DINO "
            "for the distillation's wall time"
        )
        parts.append(fmt_table(headers, rows, title, markdown=markdown))
        parts.append(
            "\n".join(targets(by_role) + [speed_line(r, by_role) for r in mine if r["role"] == "speed"])
        )
    return "\n\n".join(parts)


def speed_line(speed: dict, by_role: dict[str, list[dict]]) -> str:
    ms = speed["median_ms"]
    in_run = [r["train_images_per_s"] for r in by_role["distilled"] if r["seed"] == speed["seed"]]
    return (
        f"distill step on a pre-made batch: {speed['distill_step_images_per_s']:.0f} img/s against the "
        f"teacher-forward + student-step bound {speed['bound_images_per_s']:.0f} img/s (teacher forward "
        f"{ms['teacher forward']:.1f} ms + student step {ms['student step']:.1f} ms; whole step "
        f"{ms['distill step']:.1f} ms); in the distillation run, with data loading: "
        + (f"{in_run[0]:.0f} img/s" if in_run else "-")
    )


def targets(by_role: dict[str, list[dict]]) -> list[str]:
    """The wall-clock match, and the two targets on k-NN (means over the seeds all three roles have)."""
    lines = [
        f"seed {kd['seed']}: distillation {kd['train_s']:.0f} s, from-scratch DINO {r['train_s']:.0f} s "
        f"({r['epochs']} epochs, from a {c['train_s']:.0f} s one-epoch calibration run)"
        + (
            f"; MISMATCHED: from scratch had {r['train_s'] / kd['train_s']:.2f}x the distillation's time "
            "(the machine's load changed between the runs: rerun on an idle machine)"
            if abs(r["train_s"] / kd["train_s"] - 1) > 0.2 and r["epochs"] > 1
            else ""
        )
        for kd in by_role["distilled"]
        for r in by_role["from scratch"]
        for c in by_role["calibration"]
        if kd["seed"] == r["seed"] == c["seed"]
    ]
    seeds = set.intersection(
        *({r["seed"] for r in by_role[k]} for k in ("teacher", "distilled", "from scratch"))
    )
    if not seeds:
        return lines
    knn = {k: statistics.fmean(r["knn_top1"] for r in by_role[k] if r["seed"] in seeds) for k in ROLES[:3]}
    gain, gap = knn["distilled"] - knn["from scratch"], knn["teacher"] - knn["distilled"]
    lines.append(
        f"distilled - from scratch: {gain:+.2f} k-NN points ({'meets' if gain >= 3 else 'misses'} >= +3); "
        f"teacher - distilled: {gap:+.2f} ({'meets' if gap <= 3 else 'misses'} <= 3)"
    )
    return lines


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=None, help="default builtin:animal-mnist (quick: builtin:digits)")
    p.add_argument("--teacher", default="cvfm/small-resnet", help="registry id of the DINO teacher")
    p.add_argument("--student", default="cvfm/tiny-resnet", help="registry id of the student")
    p.add_argument(
        "--teacher-epochs", type=int, default=None, help="teacher's DINO epochs (default 20; quick 1)"
    )
    p.add_argument("--epochs", type=int, default=None, help="distillation epochs (default 30; quick 1)")
    p.add_argument(
        "--loss", action="append", default=None, help="distill --loss, repeatable (default feature)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="data-loader workers for training and evaluate")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument(
        "--dino-local-crops",
        dest="local_crops",
        type=int,
        default=0,
        help="DINO local crops (default 0, the 2 global crops only; cvfm's own default is 8)",
    )
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DINO option for the teacher and from-scratch runs, as cvfm's --opt; repeatable",
    )
    p.add_argument(
        "--results",
        default=None,
        help="JSONL file each finished run is appended to; runs already in it are not repeated "
        "(default runs/distill.jsonl; quick: runs/distill-quick.jsonl)",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="run folders, kept for a resumed benchmark (default runs/distill-bench; quick: "
        "runs/distill-bench-quick)",
    )
    p.add_argument("--summarise", metavar="FILE", help="only print the tables of a results file")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole benchmark")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps of the speed part (default 20; quick 5)"
    )
    p.add_argument("--warmup", type=int, default=None, help="its warm-up steps (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run on builtin:digits (a few minutes)")
    p.add_argument("--json", default=None, help="also write the runs to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.data = args.data or ("builtin:digits" if quick else "builtin:animal-mnist")
    args.teacher_epochs = args.teacher_epochs or (1 if quick else 20)
    args.epochs = args.epochs or (1 if quick else 30)
    args.loss = args.loss or ["feature"]
    args.steps = args.steps or (5 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    suffix = "-quick" if quick else ""
    args.results = args.results or f"runs/distill{suffix}.jsonl"
    args.workdir = args.workdir or f"runs/distill-bench{suffix}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarise:
        say(summary(ssl_bench.load_records(Path(args.summarise), legacy={}), markdown=args.markdown))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    say(f"cvfm distillation benchmark: {json.dumps(ssl_bench.versions())}; torch threads {threads}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    records = benchmark(args, workdir)
    wall = time.perf_counter() - t0
    say("\n" + "=" * 100)
    say(summary(records, markdown=args.markdown))
    say(f"\ntotal wall time {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "runs": records, "wall_s": wall}, indent=2, default=str) + "\n"
        )
        say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
