"""python -m bench.scale: how many volunteers one coordinator serves, measured.

One real coordinator (its gRPC server, SQLite ledger and hivemind peer, the reducer of every round
unless --reducers runs reducer nodes beside it: `gptswarm reducer`, each with its own credential)
and N simulated workers: gptswarm's own Worker (join, heartbeats, leases and shard downloads, the
averaging over hivemind with the run's compression, the outer step, the hash check) whose training
step is a sleep of --step-seconds; up to --per-process of them share a process, each with its own
hivemind peer (and p2pd). Their pseudo-gradients are realistic for the robust rule (a direction
the members share each round plus one of each member's own: they agree without being copies), not
zeros; the safety gate is set aside (the simulated "training" is a random walk). For each N (and
number of reducer nodes), over the rounds in which all N workers were members:

- the round time, and the parts of its end as the coordinator logs them: forming the group from the
  ledger, scoring's reference gradients (off here: the simulated training is a random walk that
  scoring would flag; bench/credit.py measures its cost), its members asking for their places
  (matchmaking), the all-reduce, the outer step, the
  checkpoint and the ledger's commit (the evaluation runs beside the rounds, on a thread);
- heartbeat and lease latency (50th and 99th percentile), as the workers see them;
- the coordinator's CPU share (its process and its p2pd) and memory, and the status API's latency;
- bytes into and out of the coordinator per round;
- with reducer nodes: each node's CPU seconds (its process and its p2pd) and bytes in and out per round.

Writes bench/results/scale.json and scale.png; bench/README.md has the figures and the projection.

  python -m bench.scale                          # N = 2, 8, 32, 64
  python -m bench.scale --workers 2,8 --rounds 3
  python -m bench.scale --workers 64 --reducers 1,2,4   # the same swarm on 1, 2 and 4 reducer nodes
"""

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections import defaultdict
from pathlib import Path

from bench.procs import Children
from bench.swarm import EXE, json_records, usage
from gptswarm.coordinator.ledger import LedgerView

HERE = Path(__file__).resolve().parent
MODEL = ["--model", "gpt-micro", "--block-size", "64"]
BATCH = 12  # sequences per step: 768 tokens
JOIN = re.compile(r"--join (\S+) (--tls-fingerprint \S+|--plaintext)")


# --- the simulated workers (one process runs several) ---

def simulate(args):
    """Run args.simulate workers in this process until SIGTERM; then write their RPC latencies."""
    import torch

    from gptswarm.logs import setup_logging
    from gptswarm.worker.config import WorkerConfig

    setup_logging(json_logs=True)
    torch.set_num_threads(1)
    step, loss = args.step_seconds, torch.tensor(2.0)
    latencies, lock = defaultdict(list), threading.Lock()  # every worker thread's RPCs, under the lock

    def timed(method, seconds):
        with lock:
            latencies[method].append(seconds)

    def speed(model_config, train, device, state_dir):  # no benchmark: the sleep's speed
        return train.batch_size * model_config.block_size / step, train.batch_size

    Simulated = simulated_worker()
    workers = [Simulated(WorkerConfig(join=args.join, token="bench", tls_fingerprint=args.pin, plaintext=not args.pin,
                                      device="cpu", name=f"{args.prefix}{i}",
                                      state_dir=Path(args.state_root) / f"{args.prefix}{i}"),
                         step=lambda x, y: time.sleep(step) or loss, speed=speed, on_rpc=timed)
               for i in range(args.simulate)]
    threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    signal.signal(signal.SIGTERM, lambda *_: [w.request_stop() for w in workers])
    for t in threads:
        t.start()
        time.sleep(0.2)  # joins spread a little, as volunteers' do
    for t in threads:
        t.join()
    with lock:
        Path(args.out).write_text(json.dumps(latencies))


def simulated_worker():
    """gptswarm's Worker whose contribution is a realistic pseudo-gradient (the robust rule's work
    depends on the values; its training step is a sleep, which leaves the model as it was): a
    direction every member shares that round plus one of its own, so that members agree (a cosine
    of about 0.3) without being copies of each other or of their last round."""
    import torch

    from gptswarm.worker.loop import Worker

    class SimulatedWorker(Worker):
        SCALE = 1e-3

        def contribution(self, grad, weight, round_):
            shared, own = torch.Generator().manual_seed(round_), torch.Generator().manual_seed(
                zlib.crc32(f"{self.config.name}/{round_}".encode()))
            return {k: (0.6 * torch.randn(g.shape, generator=shared) + torch.randn(g.shape, generator=own))
                    * self.SCALE for k, g in grad.items()}, weight
    return SimulatedWorker


# --- one measurement ---

def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


def start_reducers(children, k, join, pin, sd, workdir, env):
    """k reducer nodes (`gptswarm reducer`), each with a credential made for it; their processes, once
    every one has registered."""
    nodes = []
    for i in range(k):
        name = f"r{i + 1}"
        made = subprocess.run([*EXE, "reducer-credential", "--state-dir", str(sd), "--name", name],
                              capture_output=True, text=True, env=env, timeout=60)
        if made.returncode:
            raise RuntimeError(f"reducer-credential failed: {made.stderr.strip()}")
        log = open(workdir / f"{name}.log", "w")
        nodes.append(children.start([*EXE, "reducer", "--join", join, *(["--tls-fingerprint", pin] if pin else
                                                                         ["--plaintext"]), "--name", name,
                                     "--listen", "127.0.0.1:0", "--state-dir", str(workdir / name), "--json-logs"],
                                    stdout=log, stderr=log, env={**env, "GPTSWARM_REDUCER_CREDENTIAL": made.stdout.strip()}))
    deadline = time.time() + 120
    while not all("registered as hivemind peer" in (workdir / f"r{i + 1}.log").read_text() for i in range(k)):
        if time.time() > deadline:
            raise RuntimeError(f"the reducer nodes did not register; see {workdir}/r*.log")
        time.sleep(0.5)
    return nodes


def measure(n, text, workdir, *, rounds, step_seconds, steps_per_round, per_process, compression, timeout,
            reducers=0):
    """Start a coordinator, `reducers` reducer nodes and n simulated workers, wait for `rounds` rounds
    with all n members, stop everything; the figures (a dict)."""
    sd = workdir / "coordinator"
    sd.mkdir(parents=True, exist_ok=True)
    tokens_per_round = n * steps_per_round * BATCH * 64
    # enough data for every round of the run within one epoch (an epoch's end makes a short round:
    # its last shards wait for their credit, and the workers without a shard wait with them)
    source = Path(text).read_text()
    copies = math.ceil(2 * (rounds + 4) * tokens_per_round / (0.9 * len(source)))
    corpus = workdir / "text.txt"
    corpus.write_text(source * max(1, copies))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTSWARM_TOKEN": "bench"}
    with Children() as children:
        coord = children.start([*EXE, *map(str, [
            "coordinator", "--text", corpus, *MODEL, "--state-dir", sd, "--listen", "127.0.0.1:0", "--p2p-listen",
            "127.0.0.1:0", "--http", "127.0.0.1:0", "--batch-size", BATCH, "--tokens-per-round", tokens_per_round,
            "--max-tokens", 10**12, "--compression", compression, "--shard-tokens", 4096, "--join-burst", 10_000,
            "--joins-per-minute", 600_000, "--json-logs",
            "--max-val-loss-rise", 1e6, "--score-fraction", 0, "--replay-fraction", 0])], stderr=subprocess.PIPE,
            text=True, env=env)
        # (the gate and scoring are not measured here: the simulated training is a random walk, which
        # either would refuse; scoring's cost is bench/credit.py's)
        log = open(workdir / "coordinator.log", "w")
        join = secure = http = None
        for line in coord.stderr:
            log.write(line)
            if m := re.search(r"status page: (http://\S+?)/?$", line.strip()):
                http = m.group(1)
            if m := JOIN.search(line):
                join, secure = m.group(1), m.group(2).split()
                break
        threading.Thread(target=lambda: [(log.write(line), log.flush()) for line in coord.stderr], daemon=True).start()
        if join is None:
            raise RuntimeError(f"the coordinator did not start; see {workdir / 'coordinator.log'}")
        pin = secure[1] if secure[0] == "--tls-fingerprint" else ""
        nodes = start_reducers(children, reducers, join, pin, sd, workdir, env)
        sims = []
        for i in range(math.ceil(n / per_process)):
            k = min(per_process, n - i * per_process)
            out = open(workdir / f"sim{i}.log", "w")
            sims.append(children.start([sys.executable, "-m", "bench.scale", "--simulate", str(k), "--join", join,
                                        "--pin", pin, "--prefix", f"p{i}w", "--state-root", str(workdir / "workers"),
                                        "--step-seconds", str(step_seconds), "--out", str(workdir / f"sim{i}.json")],
                                       stdout=out, stderr=out, cwd=HERE.parent, env=env))
        t0 = time.time()
        records, full = [], []  # the rounds so far; those since the first with all n members
        window = None  # (time, coordinator CPU seconds, memory, workers' CPU seconds, round) at the first
        nodes_cpu0 = []
        status_ms = []
        while len(full) < rounds + 1 and time.time() - t0 < timeout:
            time.sleep(1)
            records = [r for r in json_records(workdir / "coordinator.log") if r.get("event") == "round"]
            first = next((i for i, r in enumerate(records) if r["members"] >= n), None)
            full = records[first:] if first is not None else []
            if full and window is None:
                window = (time.time(), *usage(coord.pid), sum(usage(p.pid)[0] for p in sims), full[0]["round"])
                nodes_cpu0 = [usage(p.pid)[0] for p in nodes]
            if http and full:
                t = time.perf_counter()
                try:
                    urllib.request.urlopen(f"{http}/api/v1/status", timeout=10).read()
                    status_ms.append(1000 * (time.perf_counter() - t))
                except OSError:
                    pass
        end = (time.time(), *usage(coord.pid), sum(usage(p.pid)[0] for p in sims),
               records[-1]["round"] if records else 0)
        nodes_cpu1 = [usage(p.pid)[0] for p in nodes]
        for s in sims:
            children.stop(s, grace=30)
        for p in nodes:
            children.stop(p, grace=30)
        children.stop(coord)
    records = [r for r in json_records(workdir / "coordinator.log") if r.get("event") == "round"]
    first = next((i for i, r in enumerate(records) if r["members"] >= n), None)
    if first is None or window is None:
        raise RuntimeError(f"N={n}: no round with all {n} workers in {timeout} s; see {workdir}")
    full = records[first + 1:first + 1 + rounds]  # the first may have begun before all joined
    rounds_of = {r["round"] for r in full}
    with LedgerView(sd / "ledger.sqlite") as ledger:
        rows = ledger.round_timings()
        incomplete = ledger.incomplete_rounds(min(rounds_of), max(rounds_of))  # not the stop's
        worker_bytes = ledger.averaging_totals()["worker_bytes"]
        contributions = ledger.contributions_total()
    latencies = defaultdict(list)
    for f in workdir.glob("sim*.json"):
        for method, values in json.loads(f.read_text()).items():
            latencies[method] += values
    parts = {k: statistics.median(r["seconds"][k] for r in full) for k in full[0]["seconds"]}
    evaluations = [r["seconds"] for r in json_records(workdir / "coordinator.log") if r.get("event") == "evaluation"]
    wall = end[0] - window[0]
    measured_rounds = max(1, end[4] - window[4])
    node_rows = []
    for i in range(reducers):  # each node's CPU (with its p2pd) and bytes, per round, over the measured rounds
        red = [r for r in json_records(workdir / f"r{i + 1}.log") if r.get("event") == "reduction"
               and r["round"] in rounds_of]
        node_rows.append({"name": f"r{i + 1}", "rounds": len(red),
                          "cpu_seconds_per_round": round((nodes_cpu1[i] - nodes_cpu0[i]) / measured_rounds, 3)
                          if nodes_cpu1[i] is not None else None,
                          "bytes_in_per_round": statistics.median(r["bytes_in"] for r in red) if red else None,
                          "bytes_out_per_round": statistics.median(r["bytes_out"] for r in red) if red else None})
    return {
        "reducer_nodes": node_rows,
        "workers": n, "rounds_measured": len(full), "tokens_per_round": tokens_per_round,
        "every_round_included_every_worker": all(r["included"] == r["members"] == n for r in full),
        "rounds_failed_or_rejected": incomplete,
        "round_seconds": statistics.median(rows[r][0] for r in rounds_of),
        "training_seconds": steps_per_round * step_seconds,
        "round_end_seconds": sum(parts.values()),
        "parts_seconds": parts,
        "evaluation_seconds": statistics.median(evaluations) if evaluations else None,
        "heartbeat_ms": {"p50": 1000 * percentile(latencies["Heartbeat"], 0.5),
                         "p99": 1000 * percentile(latencies["Heartbeat"], 0.99), "calls": len(latencies["Heartbeat"])},
        "lease_ms": {"p50": 1000 * percentile(latencies["LeaseShard"], 0.5),
                     "p99": 1000 * percentile(latencies["LeaseShard"], 0.99), "calls": len(latencies["LeaseShard"])},
        "status_api_ms": statistics.median(status_ms) if status_ms else None,
        # CPU seconds (of the process and its p2pd) per second, and per round, from the first full round on
        "coordinator_cpu_share": round((end[1] - window[1]) / wall, 3),
        "coordinator_cpu_seconds_per_round": round((end[1] - window[1]) / measured_rounds, 3),
        "workers_cpu_share": round((end[3] - window[3]) / wall, 3),
        "coordinator_rss_mb": round(end[2] / 2**20, 1),
        "bytes_out_per_round": statistics.median(rows[r][1] for r in rounds_of),
        "bytes_in_per_round": round(n * worker_bytes / max(1, contributions)),  # n contributions
    }


def n_params(preset, vocab, block):
    from gptswarm.mingpt_core.model import GPT, GPTConfig

    return GPT(GPTConfig.from_preset(preset, vocab, block)).num_params(non_embedding=False)


def project(results, measured_params, round_minutes=10.0):
    """The largest swarm one coordinator serves, from the per-worker costs measured between the two
    largest N: its link (bytes per value in, and out at the same time) and its CPU (the coordinator's
    CPU seconds per round, per added worker, per value: decoding, the robust rule, encoding, p2pd,
    heartbeats and leases), plus the fixed part of a round's end (what is not the all-reduce, at
    the largest N). Averaging must stay under 5% of a round of round_minutes without the overlap;
    with it, under half of the round (workers train ahead for at most half of a round's share)."""
    small, big = results[-2] if len(results) > 1 else {"workers": 0, "coordinator_cpu_seconds_per_round": 0}, results[-1]
    n = big["workers"]
    per_value_bytes = big["bytes_in_per_round"] / (n * measured_params)
    per_value_cpu = ((big["coordinator_cpu_seconds_per_round"] - small["coordinator_cpu_seconds_per_round"])
                     / (n - small["workers"]) / measured_params)
    per_value_cpu = max(per_value_cpu, 1e-12)
    fixed = big["round_end_seconds"] - big["parts_seconds"]["all_reduce"]
    rows = []
    for model, params in (("gpt2 (124M)", n_params("gpt2", 50257, 1024)),
                          ("gpt-mini (char-level)", n_params("gpt-mini", 65, 256))):
        for gbit in (1, 10):
            link = per_value_bytes * params / (gbit * 1e9 / 8)  # seconds per worker per round
            cpu = per_value_cpu * params
            per_worker = max(link, cpu)
            row = {"model": model, "parameters": params, "link_gbit": gbit, "link_seconds_per_worker": round(link, 4),
                   "cpu_seconds_per_worker": round(cpu, 4), "first_bottleneck": "link" if link >= cpu else "CPU",
                   "round_minutes": round_minutes}
            for label, share in (("without_overlap", 0.05), ("with_overlap", 0.5)):
                budget = share * round_minutes * 60 - fixed
                row[f"max_workers_{label}"] = max(0, int(budget / per_worker))
            rows.append(row)
    return {"per_value_bytes_in": round(per_value_bytes, 4), "per_value_cpu_ns": round(1e9 * per_value_cpu, 2),
            "fixed_seconds": round(fixed, 3), "measured_between_workers": [small["workers"], n], "rows": rows}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["workers"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(ns)
    for part in results[0]["parts_seconds"]:
        v = [r["parts_seconds"][part] for r in results]
        a.bar([str(n) for n in ns], v, bottom=bottom, label=part)
        bottom = [x + y for x, y in zip(bottom, v)]
    a.set_xlabel("simulated workers")
    a.set_ylabel("seconds per round")
    a.set_title("the end of a round, by part (median)")
    a.legend(fontsize=8)
    b.plot(ns, [r["heartbeat_ms"]["p99"] for r in results], "o-", label="heartbeat p99 (ms)")
    b.plot(ns, [r["lease_ms"]["p99"] for r in results], "s-", label="lease p99 (ms)")
    b.plot(ns, [100 * r["coordinator_cpu_share"] for r in results], "^-", label="coordinator CPU (% of a core)")
    b.set_xscale("log", base=2)
    b.set_xlabel("simulated workers")
    b.legend(fontsize=8)
    b.set_title("the coordinator under load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2,8,32,64", help="the swarm sizes to measure, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="rounds with every worker in them, per size")
    p.add_argument("--step-seconds", type=float, default=0.05, help="a simulated training step (768 tokens)")
    p.add_argument("--steps-per-round", type=int, default=40, help="steps each worker trains per round")
    p.add_argument("--per-process", type=int, default=16, help="simulated workers per process")
    p.add_argument("--compression", default="8bit", help="the run's pseudo-gradient codec")
    p.add_argument("--reducers", default="0", help="reducer nodes (`gptswarm reducer`) to run beside the coordinator, "
                   "comma-separated: each size is measured with each (0: the coordinator reduces alone)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per size, at most")
    p.add_argument("--text", default=str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="the training text (its shards are what the workers lease)")
    p.add_argument("--results", default=str(HERE / "results"), help="where scale.json and scale.png go")
    p.add_argument("--workdir", default="runs/bench-scale", help="state directories and logs")
    # a process of simulated workers (started by the measurement)
    p.add_argument("--simulate", type=int, help=argparse.SUPPRESS)
    p.add_argument("--join", help=argparse.SUPPRESS)
    p.add_argument("--pin", default="", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="w", help=argparse.SUPPRESS)
    p.add_argument("--state-root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.simulate:
        return simulate(args)
    if not Path(args.text).is_file():
        sys.exit(f"Error: no such text file: {args.text} (pass --text)")
    try:
        sizes = [int(n) for n in args.workers.split(",")]
    except ValueError:
        sys.exit(f"Error: --workers wants numbers separated by commas, not {args.workers!r}")
    import shutil

    results, with_nodes = [], []
    for k in (int(x) for x in args.reducers.split(",")):
        for n in sizes:
            workdir = Path(args.workdir).resolve() / f"n{n}k{k}"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            print(f"[scale] {n} simulated workers, {k} reducer node(s) ...", flush=True)
            r = measure(n, str(Path(args.text).resolve()), workdir, rounds=args.rounds,
                        step_seconds=args.step_seconds, steps_per_round=args.steps_per_round,
                        per_process=args.per_process, compression=args.compression, timeout=args.timeout, reducers=k)
            print(json.dumps(r), flush=True)
            (results if k == 0 else with_nodes).append(r)
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": f"{os.cpu_count()} cores",
           "model": "gpt-micro (0.81M parameters)", "compression": args.compression,
           "step_seconds": args.step_seconds, "steps_per_round": args.steps_per_round, "sizes": results,
           "with_reducer_nodes": with_nodes}
    if len(results) > 1:
        out["projection"] = project(results, n_params("gpt-micro", 65, 64))
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "scale.json").write_text(json.dumps(out, indent=1))
    if len(results) > 1:  # (a plot of the sizes measured without reducer nodes)
        plot(results, res / "scale.png")
    print(f"wrote {res / 'scale.json'}" + (f" and {res / 'scale.png'}" if len(results) > 1 else ""))


if __name__ == "__main__":
    main()
