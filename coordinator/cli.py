"""`gptswarm coordinator`: start (or resume) a swarm run and serve it until Ctrl+C."""

import json
import logging
import signal
import socket
import threading

import click



def worker_address(listen, announce_host):
    host, _, port = listen.rpartition(":")
    if announce_host:
        host = announce_host
    elif host in ("", "0.0.0.0", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for running as a service (journald, Loki, ...); fields passed as
    `extra={"fields": {...}}` are included."""

    def format(self, record):
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(json_logs=False):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("hivemind", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a reducer given no part (client-mode peers reduce nothing) warns about it every round
    logging.getLogger("hivemind.averaging.partition").setLevel(logging.ERROR)


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
@click.option("--model", default=None, help="Model preset for a new run (default gpt-nano): gpt-nano, gpt-micro, "
              "gpt-mini, gopher-44m, gpt2, gpt2-medium, gpt2-large, gpt2-xl.")
@click.option("--block-size", type=int, help="Context length (default: 256 for text, 3*digits for addition).")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False),
              help="Where the run lives (shards, ledger, checkpoints). Restarting on the same directory resumes the run.")
@click.option("--listen", default="0.0.0.0:7733", show_default=True, help="HOST:PORT of the gRPC control plane.")
@click.option("--dht-listen", default="0.0.0.0:7734", show_default=True,
              help="HOST:PORT of the hivemind peer (DHT bootstrap and averaging); workers must reach it.")
@click.option("--http", "http_listen", default="0.0.0.0:7780", show_default=True,
              help="HOST:PORT of the status page (/), its JSON (/api/v1/status) and Prometheus metrics (/metrics).")
@click.option("--announce-host", help="Public host name or IP that workers should use (default: this host's name).")
@click.option("--token", envvar="GPTSWARM_TOKEN", help="Swarm token workers must present (default: the saved one, "
              "or a new random one). Giving a new one rotates it.")
@click.option("--tokens-per-round", type=int, default=100_000, show_default=True,
              help="A round ends when the swarm has trained this many tokens in it.")
@click.option("--max-tokens", type=int, default=5_000_000, show_default=True, help="The run's token budget.")
@click.option("--compression", type=click.Choice(["none", "fp16", "8bit"]), default="fp16", show_default=True,
              help="How pseudo-gradients travel during averaging.")
@click.option("--outer-lr", type=float, default=0.7, show_default=True, help="Outer Nesterov SGD learning rate.")
@click.option("--outer-momentum", type=float, default=0.9, show_default=True, help="Outer SGD momentum.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Workers' sequences per inner step.")
@click.option("--lr", "learning_rate", type=float, default=1e-3, show_default=True, help="Inner AdamW peak learning rate.")
@click.option("--min-lr", type=float, default=1e-4, show_default=True, help="Inner learning rate at the end of the budget.")
@click.option("--warmup-iters", type=int, default=100, show_default=True, help="Inner warmup steps.")
@click.option("--shard-tokens", type=int, default=16384, show_default=True, help="Tokens per leased shard.")
@click.option("--heartbeat-interval", type=float, default=1.0, show_default=True, help="Seconds between worker heartbeats.")
@click.option("--matchmaking-time", type=float, default=5.0, show_default=True,
              help="Seconds the coordinator waits for workers to join a round's averaging group.")
@click.option("--averaging-timeout", type=float, default=60.0, show_default=True, help="Seconds an averaging may take.")
@click.option("--round-timeout", type=float, default=600.0, show_default=True,
              help="End a round after this many seconds even if it has fewer tokens.")
@click.option("--json-logs", is_flag=True, help="Log one JSON object per line (for running as a service).")
@click.option("--lease-seconds", type=float, default=60.0, show_default=True,
              help="A lease not extended by a heartbeat for this long expires and its shard is leased again.")
def coordinator(task, text, digits, tokenizer_kind, vocab_size, model, block_size, state_dir, listen, dht_listen,
                http_listen, announce_host, token, tokens_per_round, max_tokens, compression, outer_lr, outer_momentum, batch_size,
                learning_rate, min_lr, warmup_iters, shard_tokens, heartbeat_interval, matchmaking_time,
                averaging_timeout, round_timeout, json_logs, lease_seconds):
    """Run the coordinator of a swarm: prepare the data as shards, lease them to workers, end
    rounds and aggregate the workers' pseudo-gradients, keep theta_global and its checkpoints.

    It prints the command volunteers run to join. Stop it with Ctrl+C; start it again with the
    same --state-dir to resume."""
    from pathlib import Path

    from gptswarm.coordinator import run as runs
    from gptswarm.coordinator.server import Coordinator
    from gptswarm.mingpt_core.trainer import TrainConfig

    setup_logging(json_logs)
    log = logging.getLogger("gptswarm.coordinator")
    if (Path(state_dir) / "run.json").exists():
        s = runs.load_run(state_dir)
        runs.check_resume(s, state_dir, task, text, model)
        log.info("resuming run %s from %s", s.run_id, state_dir)
    else:
        cfg = TrainConfig(batch_size=batch_size, learning_rate=learning_rate, min_lr=min_lr, warmup_iters=warmup_iters)
        s = runs.new_run(state_dir, task, text, digits, tokenizer_kind, vocab_size, model or "gpt-nano", block_size,
                         None, cfg, tokens_per_round, max_tokens, compression, outer_lr, outer_momentum, shard_tokens)
        log.info("new run %s in %s", s.run_id, state_dir)
    coord = Coordinator(state_dir, token, listen, dht_listen, announce_host, heartbeat_interval, averaging_timeout,
                        matchmaking_time, round_timeout, lease_seconds, http_listen=http_listen)
    try:
        coord.start()
        join = worker_address(f"{listen.rpartition(':')[0]}:{coord.port}", announce_host)
        page = worker_address(f"{http_listen.rpartition(':')[0]}:{coord.http.port}", announce_host)
        click.echo(f"\nstatus page: http://{page}/\nworkers join with:\n"
                   f"  gptswarm worker --join {join} --token {coord.token}\n", err=True)
        wait_for_signal()
    finally:
        coord.shutdown()
