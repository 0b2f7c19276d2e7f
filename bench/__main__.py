"""python -m bench [--quick]: gptswarm side by side with one process and torch DDP, on the same
model (gpt-micro, block 64), data (character-level tinyshakespeare), global batch (2 x 12) and
token budget. Writes bench/results/latest.json (flat keys), bench/results/REPORT.md and
bench/results/loss.png. --quick: a small budget, to check that the harness works (~2 minutes).

Measured so far: validation loss of one process, DDP and the swarm; bytes per million tokens
trained for DDP (on the wire, per rank, needs root for network namespaces) and the swarm (as its
averaging messages leave each worker). Not yet: hivemind.Optimizer, tbf-shaped WAN runs, compute
utilization, join latency; their keys are null in latest.json and the report says so.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from swarm_vs_single import EXE, MODEL, evaluate, run_swarm  # noqa: E402

NOT_YET = ("loss_hivemind_opt", "bytes_per_mtok_hivemind_opt", "compute_utilization", "wan_seconds_ddp",
           "wan_seconds_swarm", "join_seconds")


def versions():
    import hivemind
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "hivemind": hivemind.__version__}


def run_single(text, tokens, out):
    iters = tokens // (24 * 64)
    t0 = time.time()
    subprocess.run([EXE, "train", "--text", text, *MODEL, "--batch-size", "24", "--max-iters", str(iters), "--lr", "1e-3",
                    "--min-lr", "1e-4", "--warmup-iters", "100", "--eval-interval", str(iters), "--device", "cpu",
                    "--quiet", "--out", str(out)], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return {"loss_single": evaluate(out, text)["val_loss"], "single_seconds": round(time.time() - t0, 1)}


def run_ddp(text, tokens, out):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return {"ddp_skipped": "needs root and iproute2 for network namespaces"}
    r = subprocess.run([sys.executable, str(HERE / "ddp.py"), "--text", text, "--iters", str(tokens // (24 * 64)),
                        "--out", str(out)], check=True, capture_output=True, text=True)
    d = json.loads(r.stdout[r.stdout.index("{"):])
    return {"loss_ddp": d["loss_ddp"], "bytes_per_mtok_ddp": d["bytes_per_mtok_ddp"], "ddp_seconds": d["wall_seconds"]}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    seen, xs, ys = 0, [], []
    for _, tokens, val_loss in result["swarm_history"]:
        seen += tokens
        xs.append(seen / 1e6)
        ys.append(val_loss)
    ax.plot(xs, ys, "o-", label="gptswarm, 2 workers, after each round")
    for key, label, style in (("loss_single", "one process", "--"), ("loss_ddp", "DDP, 2 ranks", ":")):
        if result.get(key) is not None:
            ax.axhline(result[key], linestyle=style, color="gray" if key == "loss_single" else "black",
                       label=f"{label}, at the end ({result[key]:.3f})")
    ax.set_xlabel("million tokens trained")
    ax.set_ylabel("validation loss")
    ax.set_title(f"char-level tinyshakespeare, {result['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(r):
    def fmt(k, v):
        if v is None:
            return "not measured yet"
        return f"{v:.4f}" if k.startswith("loss") else f"{v:,.1f}x" if k == "comm_reduction" else f"{v:,}"

    rows = "\n".join(f"| `{k}` | {fmt(k, r.get(k))} |" for k in (
        "loss_single", "loss_ddp", "loss_swarm", "loss_hivemind_opt", "bytes_per_mtok_ddp", "bytes_per_mtok_swarm",
        "bytes_per_mtok_hivemind_opt", "comm_reduction", "compute_utilization", "wan_seconds_ddp",
        "wan_seconds_swarm", "join_seconds"))
    goals = []
    if r.get("loss_ddp") and r.get("loss_swarm"):
        gap = (r["loss_swarm"] - r["loss_ddp"]) / r["loss_ddp"]
        goals.append(f"- Loss parity (swarm within 2% of DDP): {'met' if gap <= 0.02 else 'missed'}, "
                     f"the swarm is {gap:+.1%} against DDP.")
    if r.get("comm_reduction"):
        goals.append(f"- Communication (1000x fewer bytes than DDP): {'met' if r['comm_reduction'] >= 1000 else 'missed'}, "
                     f"{r['comm_reduction']:,.0f}x.")
    goals.append("- Compute utilization (>= 97%), slow links (5x faster than DDP), join latency, the hivemind.Optimizer "
                 "baseline and the GPU figures: not measured yet.")
    return f"""# Benchmark report

{r['date']} on {r['machine']} ({', '.join(f'{k} {v}' for k, v in r['versions'].items())}).
Model {r['model']}, {r['tokens']:,} tokens per run, global batch 2 x 12 sequences of 64 tokens.
Reproduce: `python -m bench{' --quick' if r['quick'] else ''}`.

| key | value |
|---|---|
{rows}

![validation loss](loss.png)

## Goals

{chr(10).join(goals)}

Wall times: one process {r.get('single_seconds')} s, DDP {r.get('ddp_seconds')} s, swarm {r.get('swarm_seconds')} s
({r.get('rounds')} rounds). The swarm's bytes are counted as its averaging messages leave each worker; DDP's
on each rank's network interface (each rank in its own network namespace).
"""


def main():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budget: check that the harness works")
    p.add_argument("--text", default=str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args()
    tokens = 196_608 if args.quick else 1_536_000
    results, work = Path(args.results), Path(args.results) / "tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    r = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick, "tokens": tokens,
         "model": "gpt-micro (4L/4H/128, block 64)", "versions": versions(),
         "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}, no GPU"}
    r.update(run_single(args.text, tokens, work / "single"))
    r.update(run_ddp(args.text, tokens, work / "ddp"))
    swarm = run_swarm(args.text, tokens, work / "swarm", tokens_per_round=tokens // 8 if args.quick else 48_000)
    r.update({k: swarm[k] for k in ("loss_swarm", "swarm_seconds", "rounds", "tokens_swarm")})
    r["swarm_history"] = swarm["history"]
    # what one worker sent, per million tokens trained by the whole run (DDP's figure is per rank, likewise)
    r["bytes_per_mtok_swarm"] = round(sum(swarm["bytes_sent_per_worker"]) / len(swarm["bytes_sent_per_worker"])
                                      / (swarm["tokens_swarm"] / 1e6))
    if r.get("bytes_per_mtok_ddp"):
        r["comm_reduction"] = round(r["bytes_per_mtok_ddp"] / r["bytes_per_mtok_swarm"], 1)
    for k in NOT_YET:
        r.setdefault(k, None)
    plot(r, results / "loss.png")
    (results / "latest.json").write_text(json.dumps(r, indent=1))
    (results / "REPORT.md").write_text(report(r))
    shutil.rmtree(work, ignore_errors=True)
    print((results / "REPORT.md").read_text())


if __name__ == "__main__":
    main()
