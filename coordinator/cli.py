"""`gptswarm coordinator`: start (or resume) a swarm run and serve it until Ctrl+C. Every default
shown here is the one the run and the coordinator use (run.RunSettings, run.SWARM_TRAIN,
config.CoordinatorConfig)."""

import dataclasses
import logging
import signal
import socket
import threading

import click

from gptswarm.coordinator.config import CoordinatorConfig
from gptswarm.coordinator.run import DEFAULT_PRESET, SWARM_TRAIN, RunSettings
from gptswarm.logs import setup_logging
from gptswarm.mingpt_core.model import PRESETS
from gptswarm.rounds import AGGREGATIONS, COMPRESSIONS, OUTER_DEFAULTS

RUN = {f.name: f.default for f in dataclasses.fields(RunSettings)}
PROC = CoordinatorConfig()


def worker_address(listen, announce_host):
    host, _, port = listen.rpartition(":")
    if announce_host:
        host = announce_host
    elif host in ("", "0.0.0.0", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


def wait_for_signal():
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@click.command()
@click.option("--task", type=click.Choice(["addition"]), help="Train on the built-in addition task.")
@click.option("--text", type=click.Path(dir_okay=False), help="Train on a UTF-8 text file (90/10 train/validation).")
@click.option("--digits", default=2, show_default=True, help="Digits per operand for --task addition.")
@click.option("--tokenizer", "tokenizer_kind", type=click.Choice(["char", "bpe"]), default="char", show_default=True,
              help="Tokenizer for --text.")
@click.option("--vocab-size", type=int, help="BPE vocabulary size (default 4096).")
@click.option("--model", default=None,
              help=f"Model preset for a new run (default {DEFAULT_PRESET}): {', '.join(PRESETS)}.")
@click.option("--block-size", type=int, help="Context length (default: 256 for text, 3*digits for addition).")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False),
              help="Where the run lives (shards, ledger, checkpoints). Restarting on the same directory resumes the run.")
@click.option("--listen", default=PROC.listen, show_default=True, help="HOST:PORT of the gRPC control plane.")
@click.option("--p2p-listen", default=PROC.p2p_listen, show_default=True,
              help="HOST:PORT of the coordinator's hivemind peer, which every round's averaging goes through; "
                   "workers must reach it (they only dial out).")
@click.option("--http", "http_listen", default=PROC.http_listen, show_default=True,
              help="HOST:PORT of the status page (/), its JSON (/api/v1/status) and Prometheus metrics (/metrics).")
@click.option("--announce-host", default=PROC.announce_host,
              help="Public host name or IP that workers should use (default: this host's name).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="Read the swarm token workers must present from this file (or set GPTSWARM_TOKEN); default: "
                   "the one saved in --state-dir, or a new random one. A token other than the saved one rotates it.")
@click.option("--rotate-token", is_flag=True,
              help="Make a new random swarm token: every session is revoked and workers need the new token.")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="PEM certificate (chain) for the gRPC port, e.g. from your CA (default: a self-signed one made "
                   "in --state-dir on first start, which workers pin by its fingerprint).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The private key of --tls-cert (PEM, unencrypted).")
@click.option("--plaintext", is_flag=True,
              help="Serve gRPC without TLS: only allowed when --listen is a loopback address (demos, tests).")
@click.option("--grpc-reflection", is_flag=True,
              help="Serve gRPC server reflection (lets any client list the service; for debugging with grpcurl).")
@click.option("--session-ttl", type=float, default=PROC.session_ttl, show_default=True,
              help="Seconds a worker's session may go unused before it expires (the worker then joins again with "
                   "its saved secret). Sessions also end when a worker leaves and when the token is rotated.")
@click.option("--tokens-per-round", type=int, default=RUN["tokens_per_round"], show_default=True,
              help="A round ends when the swarm has trained this many tokens in it (or --inner-steps' worth, if "
                   "more). Each worker then takes about tokens-per-round / (workers x batch-size x block-size) "
                   "inner steps per round: as the swarm grows, that share shrinks, which --inner-steps prevents.")
@click.option("--inner-steps", type=int, default=RUN["inner_steps"], show_default=True,
              help="A round lasts at least this many inner steps for each worker training in it: it ends at "
                   "inner-steps x batch-size x block-size tokens per worker when that is more than "
                   "--tokens-per-round. With only a step or two per round, AdamW's moments dominate what workers "
                   "send and the rounds' bytes buy little; tens of steps is where DiLoCo works "
                   "(bench/README.md, 'Honest swarms'). 0: rounds end on --tokens-per-round alone.")
@click.option("--round-growth", type=float, default=RUN["round_growth"], show_default=True,
              help="Rounds grow linearly with the run's progress, to this many times --tokens-per-round at its end: "
                   "short rounds while the loss falls fast, fewer bytes later (1: fixed rounds).")
@click.option("--max-tokens", type=int, default=RUN["max_tokens"], show_default=True, help="The run's token budget.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=RUN["compression"], show_default=True,
              help="How pseudo-gradients travel during averaging: none (fp32), fp16, 8bit, 4bit (blocks of 64 "
                   "values with a scale each), or topk (each worker sends the largest --topk-fraction of its "
                   "pseudo-gradient and carries the rest to its next round; bench/README.md compares them).")
@click.option("--topk-fraction", type=float, default=RUN["topk_fraction"], show_default=True,
              help="With --compression topk: the fraction of each 4096 values a worker sends (0 < f <= 1).")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default=RUN["aggregation"], show_default=True,
              help="How the coordinator reduces them: robust (outliers left out, part by part, and flagged; "
                   "docs/architecture.md) or mean (the plain token-weighted mean: only for swarms you trust).")
@click.option("--outer-lr", type=float, default=None,
              help="Outer Nesterov SGD learning rate [default: 0.7, DiLoCo's; with --compression topk, "
                   f"{OUTER_DEFAULTS['topk'][0]:g}, measured in bench/README.md].")
@click.option("--outer-momentum", type=float, default=None,
              help=f"Outer SGD momentum [default: 0.9; with --compression topk, {OUTER_DEFAULTS['topk'][1]:g}].")
@click.option("--batch-size", type=int, default=SWARM_TRAIN.batch_size, show_default=True,
              help="Workers' sequences per inner step.")
@click.option("--lr", "learning_rate", type=float, default=SWARM_TRAIN.learning_rate, show_default=True,
              help="Inner AdamW peak learning rate.")
@click.option("--min-lr", type=float, default=SWARM_TRAIN.min_lr, show_default=True,
              help="Inner learning rate at the end of the budget.")
@click.option("--warmup-iters", type=int, default=SWARM_TRAIN.warmup_iters, show_default=True,
              help="Inner warmup steps.")
@click.option("--shard-tokens", type=int, default=RUN["shard_tokens"], show_default=True,
              help="Tokens per leased shard.")
@click.option("--heartbeat-interval", type=float, default=PROC.heartbeat_interval, show_default=True,
              help="Seconds between worker heartbeats.")
@click.option("--sender-timeout", type=float, default=PROC.sender_timeout, show_default=True,
              help="Seconds a member of a round's averaging group may stay silent (before it starts sending, "
                   "or between parts) before the round goes on without it.")
@click.option("--max-leases", type=int, default=PROC.max_leases, show_default=True,
              help="Data shards a worker may be training at once; more requests are refused.")
@click.option("--averaging-timeout", type=float, default=PROC.averaging_timeout, show_default=True,
              help="Seconds an averaging may take.")
@click.option("--round-timeout", type=float, default=PROC.round_timeout, show_default=True,
              help="End a round after this many seconds even if it has fewer tokens.")
@click.option("--quarantine-after", type=int, default=PROC.quarantine_after, show_default=True,
              help="Quarantine a worker whose contribution was flagged in this many of its last "
                   "--quarantine-window rounds (no leases, no averaging until `gptswarm quarantine --lift`).")
@click.option("--quarantine-window", type=int, default=PROC.quarantine_window, show_default=True,
              help="See --quarantine-after.")
@click.option("--max-val-loss-rise", type=float, default=PROC.max_val_loss_rise, show_default=True,
              help="Take back a round whose validation loss (evaluated just after it commits, while the next "
                   "round trains) is more than this fraction (plus 0.1) above the median of the last 5 evaluated rounds: the "
                   "run goes back to the theta that round started from.")
@click.option("--score-fraction", type=float, default=PROC.score_fraction, show_default=True,
              help="Score every contribution by the loss decrease it brings per token claimed, on samples of "
                   "this many tokens per token claimed (one of the data its worker was leased, one of validation "
                   "data): low scorers are credited and weighed less, and flagged. Costs the coordinator about "
                   "twice this fraction of the swarm's compute; 0 turns scoring off.")
@click.option("--replay-fraction", type=float, default=PROC.replay_fraction, show_default=True,
              help="Of each round's members, the fraction drawn (secretly, after they sent) to have their round "
                   "re-run on this machine from the record they committed to: a replay that does not make what "
                   "they sent takes back their unverified credit and quarantines them; one that does makes the "
                   "round's credit verified. Costs this machine about this fraction of the swarm's compute (on "
                   "its CPU: far more for GPU workers); 0 turns replays off.")
@click.option("--replay-deadline", type=float, default=PROC.replay_deadline, show_default=True,
              help="Seconds a worker drawn for a replay has to upload its record; without one, the round's credit "
                   "is taken back.")
@click.option("--lease-seconds", type=float, default=PROC.lease_seconds, show_default=True,
              help="A lease not extended by a heartbeat for this long expires and its shard is leased again.")
@click.option("--join-burst", type=int, default=PROC.join_burst, show_default=True,
              help="Joins one network (an IPv4 /24 or IPv6 /64) may make at once; more wait for --joins-per-minute.")
@click.option("--joins-per-minute", type=float, default=PROC.joins_per_second * 60, show_default=True,
              help="Joins per minute one network may make after its burst (raise both for many volunteers behind "
                   "one NAT).")
@click.option("--json-logs", is_flag=True, help="Log one JSON object per line (for running as a service).")
def coordinator(task, text, digits, tokenizer_kind, vocab_size, model, block_size, state_dir, listen, p2p_listen,
                http_listen, announce_host, token_file, rotate_token, tls_cert, tls_key, plaintext, grpc_reflection,
                session_ttl, tokens_per_round, inner_steps, round_growth, max_tokens, compression, topk_fraction, outer_lr,
                outer_momentum, aggregation, batch_size, learning_rate, min_lr, warmup_iters, shard_tokens,
                heartbeat_interval, sender_timeout, max_leases, averaging_timeout, round_timeout, quarantine_after,
                quarantine_window, max_val_loss_rise, score_fraction, replay_fraction, replay_deadline, lease_seconds,
                join_burst, joins_per_minute,
                json_logs):
    """Run the coordinator of a swarm: prepare the data as shards, lease them to workers, end
    rounds and aggregate the workers' pseudo-gradients, keep theta_global and its checkpoints.

    It prints the command volunteers run to join. Stop it with Ctrl+C; start it again with the
    same --state-dir to resume.

    The swarm token can also come from the GPTSWARM_TOKEN environment variable (never put it on a
    command line, where every local user can see it)."""
    import os
    from pathlib import Path

    from gptswarm.transport import is_loopback, split_address

    from gptswarm.coordinator import run as runs
    from gptswarm.coordinator.server import Coordinator

    setup_logging(json_logs)
    log = logging.getLogger("gptswarm.coordinator")
    if (Path(state_dir) / "run.json").exists():
        s = runs.load_run(state_dir)
        runs.check_resume(s, state_dir, task, text, model)
        log.info("resuming run %s from %s", s.run_id, state_dir)
    else:
        train = dataclasses.replace(SWARM_TRAIN, batch_size=batch_size, learning_rate=learning_rate, min_lr=min_lr,
                                    warmup_iters=warmup_iters)
        s = runs.new_run(state_dir, task=task, text=text, digits=digits, tokenizer_kind=tokenizer_kind,
                         vocab_size=vocab_size, model=model or DEFAULT_PRESET, block_size=block_size,
                         train_config=train, tokens_per_round=tokens_per_round, inner_steps=inner_steps,
                         round_growth=round_growth,
                         max_tokens=max_tokens,
                         compression=compression, topk_fraction=topk_fraction, aggregation=aggregation,
                         outer_lr=outer_lr, outer_momentum=outer_momentum, shard_tokens=shard_tokens)
        log.info("new run %s in %s", s.run_id, state_dir)
    if min(max_leases, quarantine_after, quarantine_window) < 1 or min(sender_timeout, heartbeat_interval,
                                                                       lease_seconds, max_val_loss_rise,
                                                                       session_ttl, join_burst, joins_per_minute) <= 0:
        raise click.BadParameter("--max-leases, --quarantine-after, --quarantine-window, --sender-timeout, "
                                 "--heartbeat-interval, --lease-seconds, --max-val-loss-rise, --session-ttl, "
                                 "--join-burst and --joins-per-minute must be positive")
    if not 0 <= score_fraction <= 1:
        raise click.BadParameter(f"--score-fraction must be between 0 and 1, not {score_fraction:g}")
    if not 0 <= replay_fraction <= 1 or not replay_deadline > 0:
        raise click.BadParameter("--replay-fraction must be between 0 and 1 and --replay-deadline positive")
    if plaintext and not is_loopback(split_address(listen)[0]):
        raise click.BadParameter(f"--plaintext is only for a loopback --listen (demos, tests), not {listen}: "
                                 "workers' tokens and sessions would cross the network in the clear")
    if plaintext and (tls_cert or tls_key):
        raise click.BadParameter("--plaintext and --tls-cert/--tls-key contradict each other")
    token = Path(token_file).read_text().strip() if token_file else os.environ.get("GPTSWARM_TOKEN", "").strip()
    if (token_file or "GPTSWARM_TOKEN" in os.environ) and not token:
        raise click.BadParameter("the swarm token given (--token-file or GPTSWARM_TOKEN) is empty")
    if token and rotate_token:
        raise click.BadParameter("--rotate-token makes a new token: do not also give one")
    config = CoordinatorConfig(listen=listen, p2p_listen=p2p_listen, http_listen=http_listen,
                               announce_host=announce_host or "", heartbeat_interval=heartbeat_interval,
                               lease_seconds=lease_seconds, sender_timeout=sender_timeout, max_leases=max_leases,
                               averaging_timeout=averaging_timeout, round_timeout=round_timeout,
                               quarantine_after=quarantine_after, quarantine_window=quarantine_window,
                               max_val_loss_rise=max_val_loss_rise, score_fraction=score_fraction,
                               replay_fraction=replay_fraction, replay_deadline=replay_deadline,
                               tls_cert=tls_cert or "", tls_key=tls_key or "",
                               plaintext=plaintext, grpc_reflection=grpc_reflection, session_ttl=session_ttl,
                               join_burst=join_burst, joins_per_second=joins_per_minute / 60)
    coord = Coordinator(state_dir, config, token=token or None, rotate_token=rotate_token)
    try:
        coord.start()
        join = worker_address(f"{listen.rpartition(':')[0]}:{coord.port}", announce_host)
        if coord.http is not None:
            page = worker_address(f"{http_listen.rpartition(':')[0]}:{coord.http.port}", announce_host)
            click.echo(f"\nstatus page: http://{page}/", err=True)
        secure = f"--tls-fingerprint {coord.tls_fingerprint}" if coord.tls else "--plaintext"
        click.echo(f"workers join with (the token goes in the environment, not on the command line):\n"
                   f"  GPTSWARM_TOKEN={coord.token} gptswarm worker --join {join} {secure}\n", err=True)
        wait_for_signal()
    finally:
        coord.shutdown()
