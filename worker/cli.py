"""`gptswarm worker`: lend this machine to a swarm, and control a running worker. The defaults
shown are WorkerConfig's (worker/config.py)."""

import dataclasses
import json
import logging
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from gptswarm.logs import setup_logging
from gptswarm.states import WorkerState
from gptswarm.worker.config import WorkerConfig
from gptswarm.worker.control import send

if TYPE_CHECKING:
    from gptswarm.worker.loop import Worker

DEFAULTS = {f.name: f.default for f in dataclasses.fields(WorkerConfig)}

F = TypeVar("F", bound=Callable[..., Any])
CONFIG = Path("~/.config/gptswarm/worker.toml").expanduser()


def load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Defaults from a TOML file whose keys are the option names (join = "...", idle-only = true)."""
    path = Path(value) if value else CONFIG
    if not path.is_file():
        if value:
            raise click.BadParameter(f"{value}: no such file")
        return value
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path} is not valid TOML: {e}") from None
    known = {p.name for p in ctx.command.params}
    defaults = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def state_dir_option(f: F) -> F:
    return click.option("--state-dir", envvar="GPTSWARM_STATE_DIR", type=click.Path(file_okay=False),
                        default=str(DEFAULTS["state_dir"]), show_default=True,
                        help="The worker's own directory (control socket, saved pause, session, benchmark cache); "
                             "give each worker on a machine its own, e.g. one per GPU.")(f)


@click.group(invoke_without_command=True)
@click.option("--config", envvar="GPTSWARM_CONFIG", callback=load_config, is_eager=True, expose_value=False,
              type=click.Path(dir_okay=False), help=f"TOML file of settings named like these options (default {CONFIG}).")
@click.option("--join", envvar="GPTSWARM_JOIN", metavar="HOST:PORT", help="The coordinator's address, as it printed it.")
@click.option("--token-file", envvar="GPTSWARM_TOKEN_FILE", type=click.Path(dir_okay=False, exists=True),
              help="File holding the swarm token from the operator; or set GPTSWARM_TOKEN (never put the token on "
                   "the command line, where every user of this machine can read it).")
@click.option("--tls-fingerprint", envvar="GPTSWARM_TLS_FINGERPRINT", metavar="sha256:HEX",
              help="The coordinator's certificate fingerprint, as its join command shows it: the worker talks only "
                   "to a coordinator that presents that certificate. Without it the certificate must be one this "
                   "machine's CA roots trust.")
@click.option("--plaintext", envvar="GPTSWARM_PLAINTEXT", is_flag=True,
              help="Talk to the coordinator without TLS: only for one on this machine (loopback demos and tests).")
@click.option("--device", envvar="GPTSWARM_DEVICE", default=DEFAULTS["device"], show_default=True,
              help="auto (a GPU if there is one), cpu, cuda or cuda:N.")
@click.option("--name", envvar="GPTSWARM_NAME", help="Public name shown on the status page (default: host name).")
@click.option("--schedule", envvar="GPTSWARM_SCHEDULE", metavar="WINDOWS",
              help="Train only in these local-time windows, e.g. '22:00-07:00' or 'mon-fri 22:00-07:00; sat,sun 00:00-24:00'.")
@click.option("--idle-only", envvar="GPTSWARM_IDLE_ONLY", is_flag=True,
              help="Pause while other processes use the GPU (or, without a GPU, the CPU); resume after a quiet minute.")
@click.option("--max-hours", envvar="GPTSWARM_MAX_HOURS", type=float,
              help="Finish the round in progress and leave after this many hours.")
@click.option("--max-vram", envvar="GPTSWARM_MAX_VRAM", type=float, metavar="GIB",
              help="Use at most this much GPU memory: the run's model is fitted under it by smaller micro-batches, "
                   "8-bit optimizer state and activation checkpointing, in that order (`gptswarm plan` shows how), "
                   "and a model that cannot fit is refused at join. The micro-batch also shrinks on its own when "
                   "the card runs out of memory.")
@click.option("--json-logs", envvar="GPTSWARM_JSON_LOGS", is_flag=True,
              help="Log one JSON object per line (progress included), for running as a service.")
@click.option("--threads", envvar="GPTSWARM_THREADS", type=int, help="CPU threads for training on the CPU (default: all).")
@state_dir_option
@click.pass_context
def worker(ctx: click.Context, join: str | None, token_file: str | None, tls_fingerprint: str | None, plaintext: bool,
           device: str, name: str | None, schedule: str | None, idle_only: bool, max_hours: float | None,
           max_vram: float | None, json_logs: bool, threads: int | None, state_dir: str) -> None:
    """Join a swarm and train with it: lease data shards from the coordinator, train the shared
    GPT on them, and average what was learned with the other workers every round.

    Ctrl+C gives the current leases back and leaves within seconds. While it runs, `gptswarm
    worker status | pause | resume | finish` (same --state-dir) control it from another terminal.
    Every option can also come from a GPTSWARM_<OPTION> environment variable or the --config file."""
    if ctx.invoked_subcommand is not None:
        return
    if not join:
        raise click.UsageError("--join HOST:PORT is required (or a subcommand: status, pause, resume, finish)")
    import os

    import torch

    from gptswarm.worker.loop import Worker

    token = Path(token_file).read_text().strip() if token_file else os.environ.get("GPTSWARM_TOKEN", "").strip()
    if tls_fingerprint and plaintext:
        raise click.UsageError("--tls-fingerprint and --plaintext contradict each other")

    setup_logging(json_logs)
    if threads:
        torch.set_num_threads(threads)
    config = WorkerConfig(join=join, token=token, tls_fingerprint=tls_fingerprint or "", plaintext=plaintext,
                          device=device, name=name or "", state_dir=Path(state_dir),
                          schedule=schedule or "", idle_only=idle_only, max_hours=max_hours or 0.0,
                          max_vram=max_vram or 0.0)
    run(Worker(config))


def run(w: "Worker") -> None:
    """Run a Worker in the foreground: the first Ctrl+C (or SIGTERM) returns its leases and leaves,
    a second one stops at once."""
    pressed: list[int] = []

    def on_signal(*_: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(1)
        logging.getLogger("gptswarm.worker").info("stopping: returning leases and leaving (Ctrl+C again to force)")
        w.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    w.run()


def control_command(cmd: str, doc: str) -> click.Command:
    @state_dir_option
    @click.option("--json", "as_json", is_flag=True, help="Print the worker's answer as JSON.")
    def command(state_dir: str, as_json: bool) -> None:
        reply = send(state_dir, cmd)
        if as_json:
            click.echo(json.dumps(reply))
            return
        click.echo(f"{reply['name']} ({reply['worker_id']}) on {reply['device']}, coordinator {reply['coordinator']}")
        click.echo(f"  state:   {reply['state']}" + (f" ({reply['reason']})" if reply["reason"] else ""))
        click.echo(f"  round:   {reply['round']}, {reply['round_tokens']:,} tokens this round, "
                   f"{reply['tokens_per_second']:,.0f} tokens/s")
        click.echo(f"  contributed: {reply['tokens_contributed']:,} tokens")
        flags = [str(k) for k in (WorkerState.PAUSED, WorkerState.FINISHING) if reply[k]]  # flags named as the states
        if reply["schedule"]:
            flags.append(f"schedule {reply['schedule']}")
        if reply["idle_only"]:
            flags.append("idle only")
        if flags:
            click.echo("  " + ", ".join(flags))

    command.__doc__ = doc
    return worker.command(cmd)(command)


control_command("status", "Show what the running worker is doing and why.")
control_command("pause", "Pause training (kept across restarts) without leaving the swarm.")
control_command("resume", "Resume training after `pause`.")
control_command("finish", "Finish the current round, report what it trained, then exit.")
