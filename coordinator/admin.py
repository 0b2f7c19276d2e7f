"""The operator's commands on a run's state directory, whether its coordinator runs or not:
`gptswarm quarantine` (who is quarantined, and lifting it) and `gptswarm rollback` (back to a kept
round's theta). They write to the ledger; a running coordinator reads it between rounds."""

import click

from gptswarm.coordinator import run as runs
from gptswarm.coordinator.config import CoordinatorConfig
from gptswarm.coordinator.ledger import Ledger
from gptswarm.errors import UserError
from gptswarm.rounds.theta import kept_rounds

STATE_DIR = click.option("--state-dir", required=True, type=click.Path(file_okay=False, exists=True),
                         help="The run's state directory (the coordinator's --state-dir).")


def open_ledger(state_dir):
    runs.load_run(state_dir)  # a clear error if this is no run
    cfg = CoordinatorConfig()
    return Ledger(f"{state_dir}/ledger.sqlite", lease_seconds=cfg.lease_seconds,
                  heartbeat_interval=cfg.heartbeat_interval)


@click.command()
@STATE_DIR
@click.option("--lift", "lift", metavar="WORKER_ID", help="Let this quarantined worker back in.")
def quarantine(state_dir, lift):
    """List the workers quarantined for repeatedly flagged contributions, or lift one's quarantine.
    A quarantined worker gets no lease and is left out of every round's averaging until lifted."""
    ledger = open_ledger(state_dir)
    try:
        if lift:
            if not ledger.lift_quarantine(lift):
                raise UserError(f"worker {lift} is not quarantined (see `gptswarm quarantine --state-dir {state_dir}`)")
            click.echo(f"lifted the quarantine of {lift}: it may lease shards and average again")
            return
        rows = ledger.quarantined_workers()
        for w in rows:
            click.echo(f"{w['id']}  {w['name']}: {w['quarantine_reason']}")
        if not rows:
            click.echo("no worker is quarantined")
    finally:
        ledger.close()


@click.command()
@STATE_DIR
@click.option("--to-round", type=int, required=True, help="The round whose theta_global the run goes back to.")
def rollback(state_dir, to_round):
    """Take theta_global (and the outer momentum) back to a kept round's checkpoint. The coordinator
    applies it between rounds (or at its next start): the round in progress ends without a result,
    the next one starts from that theta, and workers follow through the theta hash check.
    Kept: the last 3 rounds, round 0 and every power of two."""
    rounds = kept_rounds(state_dir)
    if to_round not in rounds:
        raise UserError(f"no checkpoint of round {to_round} is kept; kept rounds: {', '.join(map(str, rounds))}")
    ledger = open_ledger(state_dir)
    try:
        ledger.request_rollback(to_round)
    finally:
        ledger.close()
    click.echo(f"rollback to round {to_round} requested: the coordinator applies it between rounds "
               "(or when it next starts)")


@click.command("reducer-credential")
@STATE_DIR
@click.option("--name", required=True, help="The reducer node's name (letters, digits, '-', '_'; at most 64).")
@click.option("--revoke", is_flag=True, help="Revoke the node's credential instead: it can no longer register.")
def reducer_credential(state_dir, name, revoke):
    """Make a credential for one of the operator's reducer nodes (`gptswarm reducer`), or revoke
    one. It is printed once: give it to the node (its --credential-file); a node of the same name
    gets a new one and the old one stops working. Only someone who can read the coordinator's
    state directory can make one: no volunteer can become a reducer."""
    import re
    import secrets

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise UserError(f"reducer name {name!r}: letters, digits, '-' and '_', at most 64")
    ledger = open_ledger(state_dir)
    try:
        if revoke:
            if not ledger.revoke_reducer(name):
                raise UserError(f"no reducer node {name!r} holds a credential")
            click.echo(f"revoked reducer node {name}'s credential (it registers no more; a running one is left "
                       "out once the coordinator restarts)")
            return
        credential = secrets.token_urlsafe(32)
        ledger.add_reducer(name, credential)
    finally:
        ledger.close()
    click.echo(credential)


CREDIT_COLUMNS = ("name", "id", "tokens_contributed", "tokens_credited", "tokens_verified", "rounds_included",
                  "rounds_flagged", "replays_passed", "replays_failed", "standing", "quarantined_at")


@click.command()
@STATE_DIR
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True,
              help="CSV (a header row, then a row per worker) or JSON ({\"run_id\", \"workers\": [...]}).")
@click.option("--output", type=click.Path(dir_okay=False, writable=True), default="-", show_default=True,
              help="Write the table to this file instead of standard output.")
def credits(state_dir, fmt, output):
    """Export the credit table for publishing: every worker that ever joined, with the tokens that
    rounds included from it (tokens_contributed), what its scores credited of them (tokens_credited:
    a contribution that did less for the loss per claimed token than the swarm's typical one is
    credited less, or nothing when flagged), what of that credit replays verified (tokens_verified:
    the rounds re-run from the worker's record that made what it sent), the rounds it was included
    and flagged in, its replays passed and failed, its last standing (1: typical; below 0.25:
    flagged) and when it was quarantined, if it is (Unix time). Most credited first."""
    import csv
    import io
    import json

    settings = runs.load_run(state_dir)
    ledger = open_ledger(state_dir)
    try:
        rows = [{k: round(r[k], 4) if k == "standing" and r[k] is not None else r[k] for k in CREDIT_COLUMNS}
                for r in ledger.credit_table()]
    finally:
        ledger.close()
    if fmt == "json":
        text = json.dumps({"run_id": settings.run_id, "workers": rows}, indent=1) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CREDIT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    with click.open_file(output, "w") as f:
        f.write(text)
