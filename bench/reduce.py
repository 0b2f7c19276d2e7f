"""python -m bench.reduce: the reduce alone. One real RoundReducer (the coordinator's side of a
round: its hivemind peer and p2pd, the reducer's validation, the robust rule or the mean, the
reply codec) and N senders over real hivemind streams, each sending what a worker's all-reduce
sends (hivemind's TensorPartContainer splits its pseudo-gradient into parts, encoded in the run's
codec), encoded before the clock starts, so that N can be large on this machine.

The pseudo-gradients are realistic, not zeros (the robust rule's work depends on the values):
two transformer blocks of gpt2-small's shapes (14.2M values, matrices and the small biases and
LayerNorms), each tensor at a scale of its own, every member a shared direction plus noise of its
own (cosine about 0.2 between two members, as honest members of a short round), weighed by the
tokens the ledger would credit (1,000-4,000). Two rounds per configuration: the first fills the
rule's history (the copy checks against a member's last contribution and the last average need
one), the second is measured; in it every member sends another member's first-round parts (no
member repeats itself, nobody sends the same as another: honest as far as the rule can tell).

Per configuration (codec x aggregation x N): the reducer process's CPU seconds over the round
(every thread of the process) and its p2pd's, per value per sender, in nanoseconds; members
flagged or left out (must be 0: every member is honest); every member received the same bytes.
Beside it, measured in the same run on the same bytes: the floor, a decode of one sender's
encoded parts and a torch add of the decoded values into a sum, per value. With --profile, where
the reducer's CPU goes by stage (decode, the rule or the sum, the reply's encoding, the rest:
transport, protobuf and asyncio), from CPU clocks around each stage.

    python -m bench.reduce [--senders 2,8,32] [--codecs fp16,8bit,4bit,topk] [--aggregations robust,mean]
                           [--out bench/results/reduce.json]
"""

import argparse
import asyncio
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WIDTH = 768  # gpt2-small's
BLOCKS = 2
TICK = os.sysconf("SC_CLK_TCK")


def template(width=WIDTH, blocks=BLOCKS):
    """Transformer blocks of gpt2's shapes (two of gpt2-small's width: 14.2M values), as {name: tensor}."""
    w = width
    shapes = {}
    for b in range(blocks):
        shapes.update({f"h.{b}.ln_1.weight": (w,), f"h.{b}.ln_1.bias": (w,),
                       f"h.{b}.attn.c_attn.weight": (3 * w, w), f"h.{b}.attn.c_attn.bias": (3 * w,),
                       f"h.{b}.attn.c_proj.weight": (w, w), f"h.{b}.attn.c_proj.bias": (w,),
                       f"h.{b}.ln_2.weight": (w,), f"h.{b}.ln_2.bias": (w,),
                       f"h.{b}.mlp.c_fc.weight": (4 * w, w), f"h.{b}.mlp.c_fc.bias": (4 * w,),
                       f"h.{b}.mlp.c_proj.weight": (w, 4 * w), f"h.{b}.mlp.c_proj.bias": (w,)})
    return {k: torch.zeros(s) for k, s in shapes.items()}


def pseudo_gradients(count, seed, size):
    """`count` honest members' pseudo-gradients: a shared direction at each tensor's own scale plus
    each member's own noise, lists of tensors in the template's order; size: template()'s arguments."""
    g = torch.Generator().manual_seed(seed)
    tmpl = template(*size)
    scales = {k: float(torch.exp(torch.randn((), generator=g)) * 1e-3) for k in tmpl}
    base = {k: torch.randn(t.shape, generator=g) * scales[k] for k, t in tmpl.items()}
    return [[0.5 * base[k] + torch.randn(t.shape, generator=g) * scales[k] for k, t in tmpl.items()]
            for _ in range(count)]


def encoded_parts(tensors, codec, fraction):
    """What a worker's all-reduce sends: its tensors split by hivemind's TensorPartContainer for a
    group in which the reducer takes everything, each part encoded in the run's codec."""
    from hivemind.averaging.partition import TensorPartContainer

    from gptswarm.rounds.codecs import ErrorFeedback
    from gptswarm.rounds.hivemind_ext import CODECS

    if codec == "topk":
        sent = ErrorFeedback(fraction).sparsify({str(i): t for i, t in enumerate(tensors)})
        tensors = [sent[str(i)] for i in range(len(tensors))]
    container = TensorPartContainer(tensors, peer_fractions=(1.0, 0.0), compression=CODECS[codec](fraction)[0])

    async def collect():
        return [p async for p in container.iterate_input_parts_for(0)]
    parts = asyncio.run(collect())
    container.finalize()
    return parts


# ---------------------------------------------------------------- the senders (a process of their own)

def senders_main(conn, count, codec, fraction, seed, size):
    """Runs in a child process: `count` hivemind peers, each with a member's encoded parts."""
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils.multiaddr import Multiaddr

    from gptswarm.rounds.hivemind_ext import RoundServicer

    torch.set_num_threads(1)
    members = [encoded_parts(t, codec, fraction) for t in pseudo_gradients(count, seed, size)]
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    peers = loop.run_until_complete(asyncio.gather(*[
        P2P.create(dht_mode="client", auto_nat=False, nat_port_map=False, use_relay=False, host_maddrs=[],
                   no_listen=True, startup_timeout=60) for _ in range(count)]))
    conn.send([str(p.peer_id) for p in peers])
    reducer, maddrs = conn.recv()
    target = PeerID.from_base58(reducer)
    addrs = [Multiaddr(a.split("/p2p/")[0]) for a in maddrs]
    loop.run_until_complete(asyncio.gather(*[p._client.connect(target, addrs) for p in peers]))
    conn.send("connected")

    async def send(p2p, parts, group_id, weight, prefix):
        stub = RoundServicer.get_stub(p2p, target, namespace=prefix)

        async def messages():
            yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=group_id,
                                              tensor_part=parts[0], weight=weight)
            for part in parts[1:]:
                yield averaging_pb2.AveragingData(tensor_part=part, weight=weight)
        digest, received = hashlib.sha256(), 0
        async for reply in await stub.rpc_aggregate_part(messages()):
            digest.update(reply.tensor_part.buffer)
            received += 1
        return received, digest.hexdigest()

    while True:
        task = conn.recv()
        if task is None:
            break
        group_id, weights, prefix, shift = task
        results = loop.run_until_complete(asyncio.gather(*[
            send(p, members[(i + shift) % count], group_id, weights[i], prefix) for i, p in enumerate(peers)],
            return_exceptions=True))
        conn.send([r if isinstance(r, tuple) else (0, f"{type(r).__name__}: {r}") for r in results])
    loop.run_until_complete(asyncio.gather(*[p.shutdown() for p in peers]))


# ---------------------------------------------------------------- the reducer (this process)

def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class Stages:
    """CPU time by stage, from the thread CPU clock around each: decode, the robust rule, the reply's
    encoding (the mean's running sum stays in the rest). Instruments the reducer's functions; a
    stage inside another (the rule encodes the reply) counts for itself only."""

    def __init__(self):
        import gptswarm.rounds.hivemind_ext as ext

        self.lock, self.seconds, self.saved, self.local = threading.Lock(), {}, {}, threading.local()
        self.wrap(ext, "decode", "decode")
        self.wrap(ext, "aggregate_part", "the robust rule")
        self.wrap(ext.SwarmAllReduceRunner, "_serialize_average", "the reply's encoding")

    def wrap(self, owner, name, stage):
        original = owner.__dict__[name]
        self.saved[(owner, name)] = original
        local = self.local

        def timed(*a, **kw):
            outer = getattr(local, "inner", 0.0)
            local.inner = 0.0
            t0 = time.thread_time()
            try:
                return original(*a, **kw)
            finally:
                elapsed = time.thread_time() - t0
                with self.lock:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - local.inner
                local.inner = outer + elapsed
        setattr(owner, name, timed)

    def restore(self):
        for (owner, name), original in self.saved.items():
            setattr(owner, name, original)


def floor(codec, fraction, seed, size):
    """ns per value: decode of one member's encoded parts, and a torch add of the decoded values into
    a sum, part by part as the reducer meets them."""
    from gptswarm.rounds.codecs import decode
    parts = encoded_parts(pseudo_gradients(1, seed + 7, size)[0], codec, fraction)
    sizes = [math.prod(p.size) for p in parts]
    sums = [torch.zeros(n) for n in sizes]
    decode_s = add_s = 0.0
    for _ in range(3):
        for part, n, total in zip(parts, sizes, sums):
            t0 = time.thread_time()
            decoded = decode(part, n).reshape(-1)
            t1 = time.thread_time()
            total.add_(decoded)
            decode_s, add_s = decode_s + t1 - t0, add_s + time.thread_time() - t1
    return {"decode_ns": round(1e9 * decode_s / 3 / sum(sizes), 2), "add_ns": round(1e9 * add_s / 3 / sum(sizes), 2)}


def receive(conn, child, timeout=900.0):
    """The senders' next message; raises if their process died or went silent."""
    deadline = time.monotonic() + timeout
    while not conn.poll(1.0):
        if not child.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the senders' process {'ended' if not child.is_alive() else 'went silent'}")
    return conn.recv()


def run_config(node, conn, child, peer_ids, codec, aggregation, fraction, values, profile, size, scoring=False):
    """scoring: the reducer also takes every member's dot products with two reference vectors as
    its parts arrive (coordinator/scoring.py's Probe; random references of the vector's size)."""
    from gptswarm.coordinator.scoring import Probe
    from gptswarm.rounds.averaging import Group, RoundReducer

    prefix = f"bench-{codec}-{aggregation}-{len(peer_ids)}"
    refused = []
    reducer = RoundReducer(node, template(*size), prefix=prefix, compression=codec, aggregation=aggregation,
                           sender_timeout=120.0, on_refused=lambda peer, reason: refused.append(reason),
                           topk_fraction=fraction)
    weights = [1000 + (1237 * i) % 3000 for i in range(len(peer_ids))]
    p2pd = node.p2p._child.pid
    rows = []
    try:
        for round_ in range(2):
            stages = Stages() if profile and round_ == 1 else None
            group = Group(round_, {p: (f"w{i}", w) for i, (p, w) in enumerate(zip(peer_ids, weights))})
            out = {}
            probe = None
            if scoring:
                gen = torch.Generator().manual_seed(round_)
                probe = Probe({f"w{i}": torch.randn(values, generator=gen) for i in range(len(peer_ids))},
                              torch.randn(values, generator=gen), {"": 1, **{f"w{i}": 1 for i in range(len(peer_ids))}})
            cpu0, daemon0, wall0 = time.process_time(), cpu_seconds(p2pd), time.perf_counter()
            thread = threading.Thread(target=lambda: out.update(r=reducer.reduce(group, 600.0, probe=probe)))
            thread.start()
            conn.send((group.group_id, weights, prefix, round_))
            replies = receive(conn, child)
            thread.join()
            wall = time.perf_counter() - wall0
            cpu, daemon = time.process_time() - cpu0, cpu_seconds(p2pd) - daemon0  # every thread; p2pd in ticks
            if stages is not None:
                stages.restore()
            r = out["r"]
            digests = {d for _, d in replies}
            per = 1e9 / (values * len(peer_ids))
            rows.append({"round": round_, "ok": r.ok, "error": r.error, "wall_s": round(wall, 3),
                         "reducer_cpu_s": round(cpu, 3), "p2pd_cpu_s": round(daemon, 3),
                         "reducer_ns_per_value_sender": round(cpu * per, 2),
                         "p2pd_ns_per_value_sender": round(daemon * per, 2),
                         "flagged": len(r.flagged), "left_out": len(r.rejected),
                         "values_left_out": r.stats.values_left_out if r.stats else 0,
                         "replies": sorted({n for n, _ in replies}), "identical": len(digests) == 1,
                         "refused": len(refused), "bytes_sent": r.bytes_sent,
                         "stages_ns_per_value_sender": {k: round(v * per, 2) for k, v in stages.seconds.items()}
                         if stages is not None else None})
    finally:
        reducer.shutdown()
    return rows


MODELS = {"gpt2 (124M)": (50257, 1024, 768, 12), "gpt2-xl (1.5B)": (50257, 1024, 1600, 48)}  # vocab, block, width, layers


def gpt2_params(vocab, block, width, layers):
    """GPT-2's parameter count (tied embeddings): 124,439,808 for gpt2, 1,557,611,200 for gpt2-xl."""
    return vocab * width + block * width + layers * (12 * width * width + 13 * width) + 2 * width


def project(results, workers=1000, round_minutes=10.0, share=0.5):
    """How many reducer nodes `workers` need, from this run's costs: per codec (robust), the reducer's
    CPU per value (its process and its p2pd) as a + b * N, fitted between the two largest N measured
    (a: what is paid once per value, the reply's encoding and the average's sketch; b: per sender);
    bytes per value in (a member's part) and out (the reply, to every member; top-k's replies are the
    union of the members' supports, dense well before a thousand members: 8-bit's size). A node reduces
    1/K of the values of every member on one core (as measured: the rule runs on one thread) and must
    finish in `share` of a round (the overlap hides half of one), its link full duplex."""
    rows = []
    for codec in sorted({r["codec"] for r in results["runs"]}):
        runs = sorted((r for r in results["runs"] if r["codec"] == codec and r["aggregation"] == "robust"),
                      key=lambda r: r["senders"])
        if len(runs) < 2:
            continue
        (n1, c1), (n2, c2) = [(r["senders"], r["senders"] * (r["reducer_ns_per_value_sender"]
                                                                + r["p2pd_ns_per_value_sender"])) for r in runs[-2:]]
        b = max((c2 - c1) / (n2 - n1), 0.0)
        a = max(c2 - b * n2, 0.0)
        bytes_in = BYTES_IN[codec]
        bytes_out = 1.0 if codec == "topk" else bytes_in
        for model, shape in MODELS.items():
            params = gpt2_params(*shape)
            budget = share * round_minutes * 60
            cpu = params * (a + b * workers) * 1e-9  # CPU seconds per round, all nodes together
            for gbit in (1, 10):
                link = params * workers * max(bytes_in, bytes_out) / (gbit * 1e9 / 8)  # seconds, all nodes together
                nodes = max(1, math.ceil(max(cpu, link) / budget))
                per_node = budget / (max(cpu, link) / workers)  # members one node serves whole
                rows.append({"model": model, "parameters": params, "codec": codec, "link_gbit": gbit,
                             "workers": workers, "cpu_seconds_per_round": round(cpu), "link_seconds_per_round":
                             round(link), "first_bottleneck": "link" if link >= cpu else "CPU",
                             "reducer_nodes_needed": nodes, "workers_per_node_at_one_node": int(per_node)})
        results.setdefault("fit", {})[codec] = {"fixed_ns_per_value": round(a, 2), "ns_per_value_per_sender": round(b, 2),
                                                "between_senders": [n1, n2]}
    return {"workers": workers, "round_minutes": round_minutes, "share_of_round": share, "rows": rows}


def table(results):
    """The results as markdown: the reduce per configuration beside the floor, then the projection."""
    print("| codec | aggregation | N | reducer ns / value / sender | its p2pd | floor: decode + add | by stage "
          "(decode, rule, reply's encoding) | wall s | flagged | same bytes to all |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        f, st = results["floor"][r["codec"]], r.get("stages_ns_per_value_sender") or {}
        stages = ", ".join(f"{st.get(k, 0):.2f}" for k in ("decode", "the robust rule", "the reply's encoding"))
        print(f"| {r['codec']} | {r['aggregation']} | {r['senders']} | {r['reducer_ns_per_value_sender']:.2f} | "
              f"{r['p2pd_ns_per_value_sender']:.2f} | {f['decode_ns']:.2f} + {f['add_ns']:.2f} | {stages} | "
              f"{r['wall_s']:.2f} | {r['flagged']} | {'yes' if r['identical'] else 'NO'} |")
    proj = project(results)
    print(f"\n{proj['workers']} workers, {proj['round_minutes']:g}-minute rounds, the reduce within "
          f"{proj['share_of_round']:.0%} of a round, one core and one link per reducer node:\n")
    print("| model | codec | link per node | CPU s per round (all nodes) | link s per round (all nodes) | binds first "
          "| reducer nodes needed |")
    print("|---|---|---|---|---|---|---|")
    for row in proj["rows"]:
        print(f"| {row['model']} | {row['codec']} | {row['link_gbit']} Gbit/s | {row['cpu_seconds_per_round']:,} | "
              f"{row['link_seconds_per_round']:,} | {row['first_bottleneck']} | {row['reducer_nodes_needed']} |")
    print("\nfits:", json.dumps(results.get("fit")))
    return results


BYTES_IN = {"fp16": 2.0, "8bit": 1.0, "4bit": 0.5 + 2 / 64, "topk": 0.03 * 3}  # a member's part, per value


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.reduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--senders", default="2,8,32", help="group sizes N (comma-separated)")
    p.add_argument("--codecs", default="fp16,8bit,4bit,topk")
    p.add_argument("--aggregations", default="robust,mean")
    p.add_argument("--topk-fraction", type=float, default=0.03)
    p.add_argument("--profile", action="store_true", help="CPU by stage in the measured round")
    p.add_argument("--scoring", action="store_true", help="also run each configuration with scoring's dot "
                   "products (coordinator/scoring.py), as aggregation '<name>+scoring'")
    p.add_argument("--quick", action="store_true", help="one small block (0.8M values), N=2, 8bit: check the harness")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--table", metavar="JSON", help="print a results file as markdown tables, and run nothing")
    args = p.parse_args(argv)
    if args.table:
        return table(json.loads(Path(args.table).read_text()))
    size = (256, 1) if args.quick else (WIDTH, BLOCKS)
    if args.quick:
        args.senders, args.codecs = "2", "8bit"
    from gptswarm.rounds.p2p import P2PNode

    values = sum(t.numel() for t in template(*size).values())
    node = P2PNode(listen="127.0.0.1:0")
    results = {"values": values, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "torch_threads": torch.get_num_threads(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "python -m bench.reduce " + " ".join(argv if argv is not None else sys.argv[1:]),
               "floor": {}, "runs": []}
    ctx = mp.get_context("spawn")
    try:
        for codec in args.codecs.split(","):
            results["floor"][codec] = floor(codec, args.topk_fraction, 1, size)
            print(f"{codec}: floor {results['floor'][codec]}", flush=True)
            for n in map(int, args.senders.split(",")):
                here, there = ctx.Pipe()
                child = ctx.Process(target=senders_main, args=(there, n, codec, args.topk_fraction, 1000 + n, size))
                child.start()
                try:
                    peer_ids = receive(here, child)
                    here.send((str(node.peer_id), node.maddrs()))
                    receive(here, child)
                    for aggregation, scoring in [(a, s) for a in args.aggregations.split(",")
                                                 for s in ((False, True) if args.scoring else (False,))]:
                        rows = run_config(node, here, child, peer_ids, codec, aggregation, args.topk_fraction, values,
                                          args.profile, size, scoring)
                        m = rows[-1]
                        aggregation = aggregation + ("+scoring" if scoring else "")
                        results["runs"].append({"codec": codec, "aggregation": aggregation, "senders": n,
                                                **m, "first_round": rows[0]})
                        print(f"{codec} {aggregation} N={n}: reducer {m['reducer_ns_per_value_sender']} ns/value/sender,"
                              f" p2pd {m['p2pd_ns_per_value_sender']}, wall {m['wall_s']} s, ok {m['ok']},"
                              f" flagged {m['flagged']}, left out {m['left_out']}, identical {m['identical']}"
                              + (f", stages {m['stages_ns_per_value_sender']}" if args.profile else ""), flush=True)
                    here.send(None)
                finally:
                    child.join(60)
                    if child.is_alive():
                        child.kill()
    finally:
        node.shutdown()
    results["projection"] = project(results)
    for row in results["projection"]["rows"]:
        print(f"{row['model']} {row['codec']} {row['link_gbit']} Gbit/s: {row['workers']} workers need "
              f"{row['reducer_nodes_needed']} reducer node(s) ({row['first_bottleneck']} first: CPU "
              f"{row['cpu_seconds_per_round']} s, link {row['link_seconds_per_round']} s per round in all)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
