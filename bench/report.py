"""The benchmark's REPORT.md and plots, from the figures in latest.json. `python -m bench.report
[RESULTS_DIR]` writes them again from a results folder's latest.json."""

import json
import sys
from pathlib import Path

KEYS = ("loss_single", "loss_ddp", "loss_swarm", "loss_hivemind_opt", "bytes_per_mtok_ddp", "bytes_per_mtok_swarm",
        "bytes_per_mtok_hivemind_opt", "comm_reduction", "compute_utilization", "wan_seconds_ddp", "wan_seconds_swarm",
        "join_seconds")


def fmt(k, v):
    if v is None:
        return "not measured"
    if k.startswith("loss"):
        return f"{v:.4f}"
    if k.startswith("bytes"):
        return f"{v / 1e6:,.2f} MB"
    if k == "comm_reduction":
        return f"{v:,.1f}x"
    if k == "compute_utilization":
        return f"{v:.1%}"
    return f"{v:,.1f} s"


def goals(r):
    out = []
    ddp, sw, b = r.get("loss_ddp"), r.get("loss_swarm"), best(r)
    if ddp and sw:
        gap = (sw - ddp) / ddp
        out.append(f"- **Loss parity** (gptswarm within 2% of DDP): {'met' if gap <= 0.02 else '**missed**'}: "
                   f"{sw:.4f} vs {ddp:.4f}, {gap:+.1%}" + ("" if gap <= 0.02 else f", {gap - 0.02:.1%} over the bar") + ".")
        if b and b[0] != "fp16":
            g = (b[1]["loss_swarm"] - ddp) / ddp
            out.append(f"  The best configuration ({b[0]}): {b[1]['loss_swarm']:.4f}, {g:+.1%}: "
                       f"{'met' if g <= 0.02 else '**missed**'}.")
    else:
        out.append("- **Loss parity**: not measured (DDP needs root for its network namespaces).")
    if b and ddp:
        label, s_ = b
        red, gap = s_["comm_reduction"], (s_["loss_swarm"] - ddp) / ddp
        ok = red >= 1000 and gap <= 0.02
        out.append(f"- **Communication** (>= 1000x fewer bytes than DDP at validation loss within 2% of DDP's): "
                   f"{'met' if ok else '**missed**'}: the best configuration, {label}, sends {red:,.0f}x fewer bytes at "
                   f"loss {s_['loss_swarm']:.4f} ({gap:+.1%})" + ("" if red >= 1000 else f", {red / 1000:.1%} of the goal")
                   + "; every configuration: see the frontier below.")
    u = r.get("compute_utilization")
    if u is not None:
        out.append(f"- **Compute utilization** (>= 97%, fp16 at the bench's round length): "
                   f"{'met' if u >= 0.97 else '**missed**'}: {u:.1%}" + ("" if u >= 0.97 else f", {0.97 - u:.1%} short")
                   + "; each configuration's is in the table below.")
    wd, ws = r.get("wan_seconds_ddp"), r.get("wan_seconds_swarm")
    w = r.get("wan", {})
    if wd and ws:
        x = wd / ws
        out.append(f"- **Slow links** (gptswarm >= 5x faster than DDP to validation loss {w.get('target_loss')} "
                   f"over {w.get('rate')} links): {'met' if x >= 5 else '**missed**'}: {ws:,.0f} s vs {wd:,.0f} s, "
                   f"{x:.1f}x faster (gptswarm {w.get('configuration', 'fp16')}, the faster of "
                   f"{' and '.join(w.get('swarms', [w.get('configuration', 'fp16')]))}).")
    elif w:
        out.append(f"- **Slow links**: a run did not reach the target loss {w.get('target_loss')} (DDP {wd}, gptswarm {ws}).")
    j = r.get("join_seconds")
    if j is not None:
        out.append(f"- **Join latency**: {j:.1f} s from `gptswarm worker --join` to the first trained batch "
                   f"(mean of the workers; a fresh state dir, so the throughput benchmark is included).")
    out += robustness_goals(r) + honest_goals(r)
    out.append("- **GPU** (gpt2 124M tokens/s and MFU): not measured, no GPU on this machine (bench/gpu.py when one is lent).")
    return "\n".join(out)


def honest_goals(r):
    sweep = r.get("honest")
    if not sweep:
        return []
    ok = not (sweep["flagged"] or sweep["failed_rounds"] or sweep["parts_lost"]) and abs(sweep["loss_gap_max"]) <= 0.01
    return [f"- **Honest swarms** ({sweep['configurations']} configurations, {sweep['rounds']} rounds each, "
            f"bench/honest.py: no honest contribution flagged, no failed round, no part lost, the robust rule's "
            f"loss within 1% of the mean's): {'met' if ok else '**missed**'}: {sweep['flagged']} flagged, "
            f"{sweep['failed_rounds']} failed, {sweep['parts_lost']} parts lost, {sweep['parts_rescued']} rescued, "
            f"largest loss gap {sweep['loss_gap_max']:+.2%}."]


def robustness_goals(r):
    runs = r.get("robust", {}).get("runs", {})
    clean, mean_ = runs.get("clean"), runs.get("clean, plain mean")
    if not clean:
        return []
    out = []
    hostile = {k: v for k, v in runs.items() if v.get("hostile_flagged") is not None}
    gaps = {k: (v["loss_swarm"] - clean["loss_swarm"]) / clean["loss_swarm"] for k, v in hostile.items()}
    worst = max(gaps.values(), default=None)
    if worst is not None:
        out.append(f"- **Robustness** (every hostile run within 2% of the clean run's validation loss): "
                   f"{'met' if worst <= 0.02 else '**missed**'}: " + ", ".join(
                       f"{k} {v:+.1%}" for k, v in gaps.items()) + f" (clean {clean['loss_swarm']:.4f}).")
    if mean_ and mean_.get("round_seconds") and clean.get("round_seconds"):
        cost = clean["round_seconds"] / mean_["round_seconds"] - 1
        out.append(f"- **Robust rule's cost** (< 5% of round time): {'met' if cost < 0.05 else '**missed**'}: "
                   f"{clean['round_seconds']:.2f} s per round against {mean_['round_seconds']:.2f} s with the plain "
                   f"mean ({cost:+.1%}); coordinator CPU {clean['coordinator_cpu_seconds']} s against "
                   f"{mean_['coordinator_cpu_seconds']} s.")
    honest = sum(v.get("honest_flagged") or 0 for v in runs.values())

    clean_honest = sum(v.get("honest_flagged") or 0 for k, v in runs.items() if k.startswith("clean"))
    out.append(f"- **No honest worker flagged** in the clean runs: {'met' if clean_honest == 0 else '**missed**'} "
               f"({clean_honest}; {honest} across all the robustness runs).")
    return out


def best(r):
    """(label, figures) of the configuration that sends the fewest bytes at a validation loss within
    2% of DDP's; without one, the one with the lowest loss. None without DDP."""
    ddp, runs = r.get("loss_ddp"), [(k, v) for k, v in r.get("swarm", {}).items() if v.get("comm_reduction")]
    if not ddp or not runs:
        return None
    near = [kv for kv in runs if (kv[1]["loss_swarm"] - ddp) / ddp <= 0.02]
    return max(near, key=lambda kv: kv[1]["comm_reduction"]) if near else min(runs, key=lambda kv: kv[1]["loss_swarm"])


def frontier(r):
    """The labels of the configurations no other one beats on both loss and bytes."""
    runs = {k: v for k, v in r.get("swarm", {}).items() if v.get("bytes_per_mtok")}
    return [k for k, v in runs.items() if not any(
        o["bytes_per_mtok"] <= v["bytes_per_mtok"] and o["loss_swarm"] <= v["loss_swarm"] and
        (o["bytes_per_mtok"], o["loss_swarm"]) != (v["bytes_per_mtok"], v["loss_swarm"]) for o in runs.values())]


def mean(xs, ndigits=None):
    """The mean of the measured values (None where a run measured nothing)."""
    xs = [x for x in xs if x is not None]
    return None if not xs else round(sum(xs) / len(xs), ndigits) if ndigits else sum(xs) / len(xs)


def percent(x):
    return "—" if x is None else f"{x:.1%}"


def seconds(x):
    return "—" if x is None else f"{x:.2f} s"


def details(r):
    rows = []
    on_frontier = frontier(r)
    for c, s in sorted(r.get("swarm", {}).items(), key=lambda kv: -kv[1].get("bytes_per_mtok", 0)):
        rows.append(f"| gptswarm, {c}{' (frontier)' if c in on_frontier else ''} | {s['loss_swarm']:.4f} | "
                    f"{s['bytes_per_mtok'] / 1e6:,.2f} MB | "
                    f"{s.get('comm_reduction', 0):,.1f}x | {s['rounds']} rounds of >= {s['tokens_per_round']:,} tokens "
                    f"({s['tokens_swarm'] / s['rounds']:,.0f} on average) | "
                    f"{percent(mean(s['compute_utilization_per_worker']))} | {s['swarm_seconds']:,.0f} s |")
    d = r.get("ddp")
    if d:
        rows.insert(0, f"| DDP, gloo, fp32, every step | {d['loss']:.4f} | {d['bytes_per_mtok'] / 1e6:,.2f} MB | 1x | "
                       f"{d['steps']} steps of 2 x 12 sequences | — | {d['wall_seconds']:,.0f} s |")
    h = r.get("hivemind_opt")
    if h:
        rows.append(f"| hivemind.Optimizer (albert-style) | {h['loss']:.4f} | {h['bytes_per_mtok'] / 1e6:,.2f} MB | "
                    f"{(r['bytes_per_mtok_ddp'] or 0) / h['bytes_per_mtok']:,.1f}x | {h['epochs']} epochs of "
                    f"{h['target_batch_size']} sequences ({h['tokens']:,} tokens) | {h['compute_utilization']:.1%} | "
                    f"{h['wall_seconds']:,.0f} s |")
    if r.get("loss_single") is not None:
        rows.insert(0, f"| one process, batch 24 | {r['loss_single']:.4f} | — | — | "
                       f"{r['tokens'] // (24 * 64)} steps | — | {r['single_seconds']:,.0f} s |")
    table = ("| run | validation loss | bytes sent per worker per M tokens | less than DDP | steps | compute share | wall |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows)) if rows else ""
    extra = []
    s = r.get("swarm", {}).get("fp16")
    if s:
        extra.append(f"gptswarm fp16, per worker: compute utilization {s['compute_utilization_per_worker']}, "
                     f"join seconds {s['join_seconds_per_worker']}, bytes its averaging messages came to as they left "
                     f"the process {s['averaging_bytes_per_worker']}" + (
                         f", bytes at its network interface {s['wire_bytes_per_worker']} (coordinator: "
                         f"{s['wire_bytes_coordinator']:,})" if s.get("wire_bytes_per_worker") else "") + ".")
    w = r.get("wan")
    if w:
        extra.append(f"Slow links: DDP reached the target at step {w['ddp'].get('step_reached')} "
                     f"({w['ddp']['bytes_per_mtok'] / 1e6:,.0f} MB per M tokens); " + "; ".join(
                         f"gptswarm {k} at round {(v.get('reached') or {}).get('round')} "
                         f"({(v.get('reached') or {}).get('seconds')} s)"
                         for k, v in w.get("swarms", {w.get("configuration", "fp16"): w.get("swarm", {})}).items())
                     + ".")
    return table + "\n\n" + "\n\n".join(extra) + robustness_table(r)


def robustness_table(r):
    rob = r.get("robust")
    if not rob:
        return ""
    rows = []
    clean = rob["runs"].get("clean", {}).get("loss_swarm")
    for label, s in rob["runs"].items():
        flagged = ("—" if s.get("hostile_flagged") is None else
                   f"{s['hostile_flagged']} of {s['hostile_rounds']} rounds" +
                   (", quarantined" if s.get("hostile_quarantined") else ""))
        rows.append(f"| {label} | {s['loss_swarm']:.4f} | {(s['loss_swarm'] - clean) / clean:+.1%} | {flagged} | "
                    f"{s['honest_flagged']} | {s['rejected_rounds']} | {seconds(s['round_seconds'])} | "
                    f"{seconds(s['averaging_seconds'])} | {seconds(s['coordinator_cpu_seconds'])} |")
    return (f"\n\n### Robustness: {rob['honest']} honest workers, plus one hostile worker per attack "
            f"(bench/hostile_worker.py), {rob['tokens']:,} tokens each\n\n"
            "| run | validation loss | against clean | hostile flagged | honest flagged | rounds rejected | "
            "round | averaging | coordinator CPU |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def report(r):
    rows = "\n".join(f"| `{k}` | {fmt(k, r.get(k))} |" for k in KEYS)
    errors = "".join(f"\n- {k}: {v}" for k, v in r.get("errors", {}).items())
    return f"""# Benchmark report

{r['date']}, {r['machine']}; {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.
Model {r['model']}; character-level tinyshakespeare; {r['tokens']:,} tokens per run; every worker or rank
trains batches of 12 sequences of 64 tokens. Network: {r['network']}.
Reproduce: `sudo .venv/bin/python -m bench{' --quick' if r['quick'] else ''}` ({r['bench_seconds'] / 60:.1f} minutes).{
    chr(10) + r['carried'] if r.get('carried') else ''}

| key | value |
|---|---|
{rows}

## Goals

{goals(r)}

## Runs

{details(r)}

![validation loss](loss.png)

![communication](comm.png)

![frontier](frontier.png)
{('## Failed parts' + errors) if errors else ''}
"""


def plot(r, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for c, s in r.get("swarm", {}).items():
        seen, xs, ys = 0, [], []
        for _, tokens, val_loss in s["history"]:
            seen += tokens
            if val_loss is not None:  # evaluated after its commit: the last one may not be yet
                xs.append(seen / 1e6)
                ys.append(val_loss)
        ax.plot(xs, ys, "o-", markersize=3, label=f"gptswarm {c}, 2 workers, after each round")
    for key, label, style in (("loss_single", "one process", "--"), ("loss_ddp", "DDP, 2 ranks", ":"),
                              ("loss_hivemind_opt", "hivemind.Optimizer, 2 peers", "-.")):
        if r.get(key) is not None:
            ax.axhline(r[key], linestyle=style, color="gray", label=f"{label}, at the end ({r[key]:.3f})")
    ax.set_xlabel("million tokens trained")
    ax.set_ylabel("validation loss")
    ax.set_title(f"char-level tinyshakespeare, {r['model'].rsplit(', ', 1)[0]}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    bars = [("DDP", r.get("bytes_per_mtok_ddp")), ("hivemind.Optimizer", r.get("bytes_per_mtok_hivemind_opt"))]
    bars += [(f"gptswarm {c}", s.get("bytes_per_mtok")) for c, s in r.get("swarm", {}).items()]
    bars = [(n, v) for n, v in bars if v]
    a.barh([n for n, _ in bars], [v / 1e6 for _, v in bars], color="steelblue")
    a.set_xscale("log")
    a.set_xlabel("MB sent per worker per million tokens (log)")
    a.invert_yaxis()
    w = r.get("wan", {})
    times = [(n, v) for n, v in (("DDP", r.get("wan_seconds_ddp")), ("gptswarm fp16", r.get("wan_seconds_swarm"))) if v]
    b.barh([n for n, _ in times], [v for _, v in times], color="darkorange")
    b.set_xlabel(f"seconds to validation loss {w.get('target_loss')} over {w.get('rate')} links")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(folder / "comm.png", dpi=110)
    plt.close(fig)

    runs = {k: v for k, v in r.get("swarm", {}).items() if v.get("bytes_per_mtok")}
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        on = frontier(r)
        for k, v in runs.items():
            x, y = v["bytes_per_mtok"] / 1e6, v["loss_swarm"]
            ax.plot(x, y, "o", color="tab:red" if k in on else "tab:blue")
            ax.annotate(k, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        pts = sorted((runs[k]["bytes_per_mtok"] / 1e6, runs[k]["loss_swarm"]) for k in on)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="tab:red", label="frontier")
        if r.get("loss_ddp"):
            d = r["loss_ddp"]
            ax.axhline(d, linestyle=":", color="gray", label=f"DDP ({d:.3f}, {r['bytes_per_mtok_ddp'] / 1e6:,.0f} MB)")
            ax.axhline(d * 1.02, linestyle="--", color="gray", label="DDP + 2%")
            ax.axvline(r["bytes_per_mtok_ddp"] / 1e6 / 1000, linestyle="-.", color="green", label="1000x fewer bytes")
        ax.set_xscale("log")
        ax.set_xlabel("MB sent per worker per million tokens (log)")
        ax.set_ylabel("validation loss")
        ax.set_title("gptswarm configurations: validation loss against bytes")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "frontier.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results")
    figures = json.loads((folder / "latest.json").read_text())
    plot(figures, folder)
    (folder / "REPORT.md").write_text(report(figures))
