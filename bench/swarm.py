"""gptswarm itself in the benchmark: a coordinator and 2 workers (each a real `gptswarm` process)
train gpt-micro on character-level tinyshakespeare to a token budget, on loopback or, as root,
each on its own host of a private network (bench/netns.py) so that the bytes every worker sends
are counted at its network interface, with the links optionally shaped (--rate). Figures: the
final checkpoint's validation loss, bytes, each worker's compute utilization and join latency
(from its JSON log), and with --target-loss the wall time until a round reaches that loss.

    sudo python -m bench.swarm --text ../shared/data/tinyshakespeare.txt [--tokens 1536000] \
        [--tokens-per-round 48000] [--compression fp16|8bit|none] [--rate 20mbit --target-loss 2.5]
"""

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.netns import Net, available
from bench.procs import Children
from gptswarm.coordinator.ledger import LedgerView
from gptswarm.rounds import COMPRESSIONS, DEFAULT_TOPK
from gptswarm.states import RoundState

SCRIPT = Path(sys.executable).with_name("gptswarm")
EXE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gptswarm"]  # installed, or run in place
MODEL = ["--model", "gpt-micro", "--block-size", "64"]


def gptswarm(args, **kw):
    return subprocess.run([*EXE, *map(str, args)], check=True, capture_output=True, text=True, **kw)


def evaluate(ckpt, text):
    return json.loads(gptswarm(["eval", ckpt, "--text", text, "--json", "--device", "cpu"]).stdout)


def json_records(path):
    for line in Path(path).read_text().splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except ValueError:
                pass


def usage(pid):
    """(CPU seconds used so far, resident bytes) of a process and its children (its p2p daemon);
    (None, None) if it is gone. A child that ends meanwhile counts for nothing."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return None, None
    cpu = rss = 0.0
    for q in procs:
        with contextlib.suppress(psutil.Error):
            cpu += sum(q.cpu_times()[:2])
            rss += q.memory_info().rss
    return cpu, rss


def cpu_seconds(pid):
    """CPU seconds a process and its children have used so far (usage), or None if it is gone."""
    cpu = usage(pid)[0]
    return None if cpu is None else round(cpu, 1)


def done_rounds(sd):
    """The run's committed rounds so far, in order: [(round, tokens, val_loss, ended_at)]."""
    with LedgerView(Path(sd) / "ledger.sqlite") as ledger:
        return [(r["round"], r["tokens"], r["val_loss"], r["ended_at"]) for r in ledger.done_rounds()]


def run_swarm(text, tokens, sd, tokens_per_round=48_000, compression="fp16", outer_lr=None, outer_momentum=None,
              shard_tokens=4096, batch=12, workers=2, netns=None, rate=None, target_loss=None, sender_timeout=3,
              aggregation="robust", hostile=None, device="cpu", model=MODEL, warmup_iters=200,
              topk_fraction=DEFAULT_TOPK, round_growth=1.0):
    """Coordinator and workers train to the token budget (or until a round's validation loss reaches
    target_loss); the figures. netns: None = on a private network if root, else loopback; hostile:
    an attack of bench/hostile_worker.py, run by one more worker that joins after the first round;
    device: the workers' (cuda: all of them on the one GPU); model: the run's model flags. Every
    process it starts is gone when it returns."""
    sd = Path(sd)
    sd.mkdir(parents=True, exist_ok=True)
    netns = available() if netns is None else netns
    hosts = workers + 1 + bool(hostile)
    net = Net(hosts, rate=rate) if netns else None
    host = net.addrs[0] if net else "127.0.0.1"
    on = (lambda i, argv: net.exec(i, argv)) if net else (lambda i, argv: argv)
    with net or contextlib.nullcontext(), Children() as children:
        before = [net.tx_bytes(i) for i in range(hosts)] if net else None
        t0 = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTSWARM_TOKEN": "bench"}
        coord = children.start(on(0, [*EXE, *map(str, [
            "coordinator", "--text", text, *model, "--state-dir", sd, "--listen", f"{host}:0", "--p2p-listen",
            f"{host}:0", "--http", "127.0.0.1:0", "--batch-size", batch, "--lr", "1e-3",
            "--min-lr", "1e-4", "--warmup-iters", warmup_iters, "--tokens-per-round", tokens_per_round,
            "--inner-steps", 0, "--round-growth", round_growth, "--max-tokens", tokens,
            "--compression", compression, "--topk-fraction", topk_fraction, "--aggregation", aggregation,
            *(["--outer-lr", outer_lr] if outer_lr is not None else []),
            *(["--outer-momentum", outer_momentum] if outer_momentum is not None else []),
            "--sender-timeout", sender_timeout, "--shard-tokens", shard_tokens,
            # the averaging's own bytes and seconds: a rare replay's upload (bench.credit measures replays) would
            # share a shaped link with them at random
            "--replay-fraction", 0])]), stderr=subprocess.PIPE, text=True,
            env=env)
        join = None
        log = open(sd / "coordinator.log", "w")
        for line in coord.stderr:
            log.write(line)
            m = re.search(r"--join (\S+) (--tls-fingerprint \S+|--plaintext)", line)
            if m:
                join, secure = m.group(1), m.group(2).split()
                break
        threading.Thread(target=lambda: [log.write(line) for line in coord.stderr], daemon=True).start()
        if join is None:
            raise RuntimeError(f"the coordinator did not start; see {sd / 'coordinator.log'}")
        procs = []
        for i in range(workers):
            wlog = open(sd / f"worker{i}.log", "w")
            procs.append(children.start(on(i + 1, [*EXE, "worker", "--join", join, *secure, "--name", f"w{i}",
                                                   "--device", device, "--threads", "1", "--json-logs", "--state-dir",
                                                   str(sd / f"worker{i}")]),
                                        stdout=wlog, stderr=wlog, env=env))
        reached = None
        attacker = None
        while any(w.poll() is None for w in procs):  # workers leave when the run reaches its budget
            time.sleep(1)
            if hostile and attacker is None and (sd / "ledger.sqlite").exists() and done_rounds(sd):
                hlog = open(sd / "hostile.log", "w")
                attacker = children.start(on(hosts - 1, [sys.executable, "-m", "bench.hostile_worker", "--attack",
                                                           hostile, "--join", join, *secure, "--name",
                                                           "hostile", "--state-dir", str(sd / "hostile")]),
                                            stdout=hlog, stderr=hlog, cwd=Path(__file__).resolve().parents[1],
                                            env=env)
            if target_loss and (sd / "ledger.sqlite").exists():
                hit = [r for r in done_rounds(sd) if r[2] is not None and r[2] <= target_loss]
                if hit and reached is None:  # once: a second SIGTERM would make a worker abort its goodbye
                    reached = {"round": hit[0][0], "seconds": round(hit[0][3] - t0, 1)}
                    for w in procs:
                        children.signal(w, signal.SIGTERM)
        for w in procs:
            w.wait()
        failed = [i for i, w in enumerate(procs) if w.returncode not in (0, -signal.SIGTERM)]
        if attacker is not None:
            children.stop(attacker)
        cpu = cpu_seconds(coord.pid)
        children.stop(coord)
        wall = time.time() - t0
        sent = [net.tx_bytes(i) - before[i] for i in range(workers + 1)] if net else None
    if failed:
        raise RuntimeError(f"worker(s) {failed} failed: see {sd}/worker{failed[0]}.log")
    out = {"swarm_seconds": round(wall, 1), "tokens_per_round": tokens_per_round, "compression": compression,
           "round_growth": round_growth,
           "aggregation": aggregation, "rate": rate, "network": "namespaces" if net else "loopback",
           "coordinator_cpu_seconds": cpu}
    history = [list(r[:3]) for r in done_rounds(sd)]
    out["rounds"], out["tokens_swarm"], out["history"] = len(history), sum(r[1] for r in history), history
    with LedgerView(sd / "ledger.sqlite") as ledger:
        # what each worker's averaging messages came to as they left the process, and (namespaces) at its interface
        out["averaging_bytes_per_worker"] = [r["bytes_sent"] for r in ledger.bytes_sent_by_workers()
                                             if r["name"] != "hostile"]
        out["round_seconds"], out["averaging_seconds"] = ledger.done_round_means()
        out["rejected_rounds"] = ledger.round_counts().get(RoundState.REJECTED, 0)
        by_name = ledger.contributions_by_name()
        hostile_row = by_name.get("hostile", {"judged": 0, "flagged": 0})
        out["honest_flagged"] = sum(c["flagged"] for name, c in by_name.items() if name != "hostile")
        out["hostile_flagged"] = hostile_row["flagged"] if hostile else None
        if hostile:
            out["hostile_rounds"] = hostile_row["judged"]
            out["hostile_quarantined"] = any(w["name"] == "hostile" for w in ledger.quarantined_workers())
    if sent:
        out["wire_bytes_per_worker"], out["wire_bytes_coordinator"] = sent[1:], sent[0]
    records = [list(json_records(sd / f"worker{i}.log")) for i in range(workers)]
    out["join_seconds_per_worker"] = [next((r["seconds_since_start"] for r in rs if r.get("event") == "first_step"), None)
                                      for rs in records]
    out["compute_utilization_per_worker"] = [next((r["compute_utilization"] for r in rs if r.get("event") == "utilization"),
                                                  None) for rs in records]
    if target_loss:
        out["target_loss"], out["reached"] = target_loss, reached
    else:
        out["loss_swarm"] = evaluate(sd / "checkpoints" / "latest", text)["val_loss"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--tokens", type=int, default=1_536_000, help="token budget of the run")
    p.add_argument("--tokens-per-round", type=int, default=48_000)
    p.add_argument("--compression", default="fp16", choices=COMPRESSIONS)
    p.add_argument("--topk-fraction", type=float, default=DEFAULT_TOPK, help="with --compression topk")
    p.add_argument("--round-growth", type=float, default=1.0, help="rounds grow to this many times --tokens-per-round")
    p.add_argument("--outer-lr", type=float, help="default: the coordinator's for the compression")
    p.add_argument("--outer-momentum", type=float, help="default: the coordinator's for the compression")
    p.add_argument("--shard-tokens", type=int, default=4096, help="tokens per leased shard")
    p.add_argument("--sender-timeout", type=float, default=3.0)
    p.add_argument("--aggregation", default="robust", choices=["robust", "mean"])
    p.add_argument("--hostile", help="one more worker runs this attack (bench/hostile_worker.py)")
    p.add_argument("--loopback", action="store_true", help="do not use network namespaces even as root")
    p.add_argument("--rate", help="shape each host's link with tc tbf, e.g. 20mbit (needs namespaces)")
    p.add_argument("--target-loss", type=float, help="stop once a round's validation loss reaches this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="the workers' device (cuda: all on the one GPU)")
    p.add_argument("--model-flags", default=" ".join(MODEL),
                   help="the coordinator's model flags, as one string (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--warmup-iters", type=int, default=200,
                   help="the LR warmup in steps of one worker's batch (the swarm's schedule counts the swarm's tokens: "
                        "200 x 12 x 64 tokens is the 100 steps of 2 x 12 sequences of the DDP and one-process runs)")
    p.add_argument("--workdir", default="runs/bench-swarm")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    out = run_swarm(str(Path(args.text).resolve()), args.tokens, Path(args.workdir).resolve(), args.tokens_per_round,
                    args.compression, args.outer_lr, args.outer_momentum, args.shard_tokens,
                    netns=False if args.loopback else None, rate=args.rate, target_loss=args.target_loss,
                    sender_timeout=args.sender_timeout, aggregation=args.aggregation, hostile=args.hostile,
                    workers=args.workers, device=args.device, model=shlex.split(args.model_flags),
                    batch=args.batch_size, warmup_iters=args.warmup_iters, topk_fraction=args.topk_fraction,
                    round_growth=args.round_growth)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
