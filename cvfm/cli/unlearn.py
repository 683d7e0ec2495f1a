"""`cvfm unlearn`: remove a forget set's influence from a classifier; `cvfm unlearn ledger` lists requests."""

from __future__ import annotations

import sys

import typer

from cvfm.cli import common

METHODS_HELP = (
    "retrain (exact: the original recipe on the retained data), head (exact for a frozen backbone: refit "
    "the linear head / drop k-NN rows), finetune, neggrad+, random-label, l1-sparse, salun, scrub "
    "(approximate). Default: the exact method that applies (head for a frozen backbone, else retrain)."
)

app = typer.Typer(
    help="Forget training data: exact and approximate unlearning, audited, recorded in a ledger.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def unlearn(
    ctx: typer.Context,
    model: str = typer.Option(
        None, "--model", help="The classifier: a `cvfm finetune` run folder or an earlier unlearn output."
    ),
    output: str = typer.Option(None, "--output", "-o", help="Output folder (refused if it exists)."),
    forget: str = common.Forget,
    forget_class: list[str] = common.ForgetClass,
    forget_where: list[str] = common.ForgetWhere,
    method: str = typer.Option(None, "--method", help=METHODS_HELP),
    epochs: int = typer.Option(
        None, "--epochs", min=1, help="Approximate methods (default: scaled from the training length)."
    ),
    opt: list[str] = typer.Option(None, "--opt", help="Method option key=value, e.g. --opt lr=0.02."),
    request_id: str = typer.Option(
        None, "--request-id", help="Name of the request in the ledger (default: derived from the ids)."
    ),
    ledger: str = typer.Option(None, "--ledger", help="Append-only JSONL ledger of carried-out requests."),
    test_split: str = typer.Option("test", "--test-split", help="Split scored as TA by the audit."),
    audit: bool = typer.Option(True, "--audit/--no-audit", help="Audit before/after (UA, RA, TA, MIA)."),
    seed: int = typer.Option(0, "--seed"),
    num_workers: int = common.Workers,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="retrain: continue an interrupted retraining."),
    allow_changed_data: bool = typer.Option(
        False,
        "--allow-changed-data",
        help="retrain / head on training data that changed since the model was trained (refused by "
        "default); the guarantee is then empirical, the changes recorded.",
    ),
) -> None:
    """Make a classifier forget part of its training data, audit the result, and record it.

    The forget set is the union of --forget ids, --forget-class classes and --forget-where matches; the
    retained set is the rest of the training data named in the model's run.json. Writes the output
    folder (classifier/, run.json whose recipe now leaves out every forgotten id, forgotten_ids.txt,
    unlearn.json, attack_scores.png) and prints one JSON line: request, method, guarantee (exact or
    empirical), audit metrics. With --ledger the request is appended; a request already there is not
    run again.

    retrain and head are exact only on the data the model was trained on: they first compare the
    retained items (ids, labels, content hashes) with the model's data_items.jsonl, and refuse (exit 2,
    naming the items) if anything changed, unless --allow-changed-data. A model trained before digests
    were recorded gets the guarantee "exact (data unverified)".

    Examples:

      cvfm unlearn --model runs/clf --forget-class cat --method salun --opt lr=0.04 -o runs/clf-no-cat

      cvfm unlearn --model runs/clf --forget erase.txt --ledger ledger.jsonl -o runs/clf-erased

      cvfm unlearn --model runs/probe --forget-where user=alice --method head -o runs/probe-2

      cvfm unlearn ledger ledger.jsonl
    """
    if ctx.invoked_subcommand is not None:
        given = [n for n, v in (("--model", model), ("--output", output), ("--forget", forget)) if v]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} belong to `cvfm unlearn`, not to its subcommand")
        return
    from cvfm.cli.output import emit
    from cvfm.errors import UsageError
    from cvfm.unlearn.run import UnlearnConfig
    from cvfm.unlearn.run import unlearn as run_unlearn

    if not model or not output:
        raise UsageError("cvfm unlearn needs --model and --output (see cvfm unlearn --help)")
    record = run_unlearn(
        UnlearnConfig(
            model=model,
            output=output,
            request=common.forget_request(forget, forget_class, forget_where, request_id),
            method=method,
            options=common.parse_options(opt),
            epochs=epochs,
            test_split=test_split or None,
            seed=seed,
            num_workers=num_workers,
            ledger=ledger,
            audit=audit,
            overwrite=overwrite,
            resume=resume,
            allow_changed_data=allow_changed_data,
        )
    )
    if record:  # empty on the non-main processes of `accelerate launch`
        emit({k: v for k, v in record.items() if k != "forget_ids"})


@app.command("ledger")
def show_ledger(
    path: str = typer.Argument(..., help="The ledger file."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON lines (ids left out)."),
) -> None:
    """List the requests in a ledger, oldest first.

    Examples:

      cvfm unlearn ledger ledger.jsonl

      cvfm unlearn ledger ledger.jsonl --json | jq .audit.after.ua
    """
    from rich.console import Console
    from rich.table import Table

    from cvfm.cli.output import emit
    from cvfm.errors import UsageError
    from cvfm.unlearn.ledger import Ledger

    ledger = Ledger(path)
    if not ledger.path.exists():
        raise UsageError(f"ledger '{path}' does not exist")
    entries = ledger.entries()
    if as_json:
        for e in entries:
            emit({k: v for k, v in e.items() if k != "forget_ids"})
        return
    table = Table("request", "time", "method", "guarantee", "forgotten", "UA", "MIA", "model after")
    for e in entries:
        after = e.get("audit", {}).get("after", {})
        table.add_row(
            e["request_id"],
            e.get("time", "-"),
            e.get("method", "-"),
            e.get("guarantee", "-"),
            str(e.get("num_forgotten", len(e.get("forget_ids", [])))),
            _percent(after, "ua"),
            _percent(after, "mia_efficacy"),
            e.get("model_after", {}).get("path", "-"),
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: no truncated cells


def _percent(metrics: dict, key: str) -> str:
    return f"{100 * metrics[key]:.1f}" if key in metrics else "-"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="unlearn")
