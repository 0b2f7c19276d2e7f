"""python -m bench [--quick]: gptswarm side by side with one process, torch DDP and hivemind's
collaborative hivemind.Optimizer, on the same model (gpt-micro, block 64), data
(character-level tinyshakespeare), per-worker batch (12 sequences) and token budget.

Measures validation loss at equal tokens; bytes each worker sent per million tokens trained,
counted at its network interface (every process on its own host of a private network, which needs
root); gptswarm with each compression; the workers' compute utilization; wall time to a target
validation loss with every link shaped to a home uplink (tc tbf); and the seconds from
`gptswarm worker --join` to the first batch the worker trains. Writes bench/results/latest.json
(flat keys), REPORT.md (each goal met or missed, and by how much), loss.png and comm.png.
--quick: small budgets, to check that the harness works (under 3 minutes).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench import ddp, hivemind_opt, honest
from bench.netns import available
from bench.report import KEYS, best, mean, plot, report
from bench.swarm import MODEL, evaluate, gptswarm, run_swarm

HERE = Path(__file__).resolve().parent

# robustness runs (issue: a hostile worker cannot wreck the model): `honest` workers, plus one per attack
ATTACKS = ("flip20", "scale100", "noise", "const", "replay", "nan")
# gptswarm runs, the frontier of loss against bytes: label -> run_swarm settings (longer: rounds this
# many times tokens_per_round); "fp16" is the reference configuration
SWARMS = {"fp16": {}, "fp16, plain mean": dict(aggregation="mean"), "8bit": dict(compression="8bit"),
          "4bit": dict(compression="4bit"), "4bit, rounds growing 1x-4x": dict(compression="4bit", round_growth=4.0),
          "4bit, 4x longer rounds": dict(compression="4bit", longer=4),
          "topk 10%": dict(compression="topk", topk_fraction=0.1), "topk 3%": dict(compression="topk")}
FULL = dict(tokens=1_536_000, tokens_per_round=48_000, hm_tokens=1_536_000, hm_target=192, hm_lr=2e-3, rate="20mbit",
            wan_target=2.6, swarms=SWARMS,
            robust=dict(tokens=768_000, tokens_per_round=48_000, honest=3, attacks=ATTACKS),
            honest=dict(rounds=honest.ROUNDS, quick=False))
PARTS = ("single", "ddp", "swarm", "robustness", "honest", "hivemind", "wan")
QUICK = dict(tokens=98_304, tokens_per_round=32_768, hm_tokens=49_152, hm_target=96, hm_lr=1.4e-3, rate="50mbit",
             wan_target=3.2, swarms={"fp16": {}, "topk 3%": dict(compression="topk")},
             robust=dict(tokens=98_304, tokens_per_round=16_384, honest=2, attacks=("flip20",)),
             honest=dict(rounds=6, quick=True))


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} x {cpu}, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {gpu}"


def versions():
    import hivemind
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "hivemind": hivemind.__version__}


def run_single(text, tokens, out):
    iters = tokens // (24 * 64)
    t0 = time.time()
    gptswarm(["train", "--text", text, *MODEL, "--batch-size", 24, "--max-iters", iters, "--lr", "1e-3", "--min-lr",
              "1e-4", "--warmup-iters", 100, "--eval-interval", iters, "--device", "cpu", "--quiet", "--out", out],
             env={**os.environ, "OMP_NUM_THREADS": "2"})
    return {"loss_single": evaluate(out, text)["val_loss"], "single_seconds": round(time.time() - t0, 1)}


def run_configuration(text, plan, settings, sd, tokens=None, **kw):
    """run_swarm for one of the plan's configurations (its SWARMS settings; longer: rounds that many
    times the plan's tokens_per_round), with the plan's token budget unless `tokens`."""
    settings = dict(settings)
    longer = settings.pop("longer", 1)
    return run_swarm(text, tokens or plan["tokens"], sd, plan["tokens_per_round"] * longer, **settings, **kw)


def per_mtok(sent, tokens):
    return round(sum(sent) / len(sent) / (tokens / 1e6))


def main():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets: check that the harness works")
    p.add_argument("--text", default=str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="the training text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--results", default=str(HERE / "results"), help="where latest.json, REPORT.md and the plots go")
    p.add_argument("--only", metavar="PART[,PART]", help=f"run only these parts: {', '.join(PARTS)} (give another "
                   "--results: a partial run's latest.json has only their figures)")
    args = p.parse_args()
    only = set(args.only.split(",")) if args.only else set(PARTS)
    if only - set(PARTS):
        sys.exit(f"Error: unknown part(s) {', '.join(sorted(only - set(PARTS)))}; choose from {', '.join(PARTS)}")
    if not Path(args.text).is_file():
        sys.exit(f"Error: no such text file: {args.text} (pass --text)")
    text = str(Path(args.text).resolve())
    plan = QUICK if args.quick else FULL
    results, work = Path(args.results), Path(args.results) / "tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    netns = available()
    r = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick, "tokens": plan["tokens"],
         "model": "gpt-micro (4L/4H/128, block 64), 0.81M parameters", "machine": machine(), "versions": versions(),
         "network": "one network namespace per process, veth + bridge" if netns else
                    "loopback (not root: DDP, hivemind.Optimizer and the slow-link runs skipped)",
         "plan": plan, "errors": {}}
    t_all = time.time()

    def part(name, fn):
        t0 = time.time()
        print(f"[bench] {name} ...", flush=True)
        try:
            fn()
        except Exception:
            r["errors"][name] = traceback.format_exc(limit=3).strip().splitlines()[-1]
            traceback.print_exc()
        print(f"[bench] {name}: {time.time() - t0:.0f} s", flush=True)

    def single():
        r.update(run_single(text, plan["tokens"], work / "single"))

    def ddp_run():
        d = ddp.run(text, plan["tokens"] // (24 * 64), work / "ddp")
        r.update(loss_ddp=d["loss"], bytes_per_mtok_ddp=d["bytes_per_mtok"], ddp=d)

    def swarm_runs():
        r["swarm"] = {}
        for i, (label, settings) in enumerate(plan["swarms"].items()):
            s = run_configuration(text, plan, settings, work / f"swarm{i}")
            sent = s.get("wire_bytes_per_worker") or s["averaging_bytes_per_worker"]
            s["bytes_per_mtok"] = per_mtok(sent, s["tokens_swarm"])
            s["settings"] = {"longer": 1, **settings}
            r["swarm"][label] = s
        s = r["swarm"]["fp16"]
        r.update(loss_swarm=s["loss_swarm"], bytes_per_mtok_swarm=s["bytes_per_mtok"],
                 compute_utilization=mean(s["compute_utilization_per_worker"], 4),
                 join_seconds=mean(s["join_seconds_per_worker"], 4))

    def robustness():
        plan_r = plan["robust"]
        runs = {}
        for label, aggregation, attack in [("clean", "robust", None), ("clean, plain mean", "mean", None),
                                           *((a, "robust", a) for a in plan_r["attacks"])]:
            s = run_swarm(text, plan_r["tokens"], work / f"robust{len(runs)}",
                          plan_r["tokens_per_round"], workers=plan_r["honest"], aggregation=aggregation, hostile=attack,
                          netns=False)
            runs[label] = {k: v for k, v in s.items() if k != "history"}
        r["robust"] = {"honest": plan_r["honest"], "tokens": plan_r["tokens"], "runs": runs}

    def honest_sweep():  # honest-only swarms across configurations (bench/honest.py): all of it in honest.json
        h = honest.sweep(Path(text).read_text(encoding="utf-8"), honest.configurations(plan["honest"]["quick"]),
                         plan["honest"]["rounds"], jobs=min(2, os.cpu_count() or 1))
        (results / "honest.json").write_text(json.dumps(h, indent=1))
        r["honest"] = {"rounds": h["rounds"], **h["summary"]}

    def hivemind_run():
        h = hivemind_opt.run(text, plan["hm_tokens"], work / "hivemind-opt", plan["hm_target"], plan["hm_lr"])
        r.update(loss_hivemind_opt=h["loss"], bytes_per_mtok_hivemind_opt=h["bytes_per_mtok"], hivemind_opt=h)

    def wan():  # DDP against fp16 and against the best configuration (report.best), if another one
        b = best(r)
        configs = {"fp16": {}}
        if b and b[0] != "fp16":
            configs[b[0]] = b[1]["settings"]
        w = {"rate": plan["rate"], "target_loss": plan["wan_target"], "swarms": {}}
        d = ddp.run(text, plan["tokens"] // (24 * 64), work / "wan-ddp", rate=plan["rate"], target_loss=plan["wan_target"])
        for i, (label, settings) in enumerate(configs.items()):
            # a budget past the target (the swarm stops once there): the quick plan's 3 rounds reached 3.2 in
            # some runs only, when the workers' training ahead made them 2
            s = run_configuration(text, plan, settings, work / f"wan-swarm{i}", tokens=2 * plan["tokens"],
                                  rate=plan["rate"], target_loss=plan["wan_target"])
            w["swarms"][label] = {k: v for k, v in s.items() if k != "history"}
        reached = {k: v["reached"]["seconds"] for k, v in w["swarms"].items() if v.get("reached")}
        w["configuration"] = min(reached, key=reached.get) if reached else "fp16"
        w.update(ddp=d, swarm=w["swarms"][w["configuration"]])
        r.update(wan=w, wan_seconds_ddp=d["seconds_to_target"], wan_seconds_swarm=reached.get(w["configuration"]))

    for name, fn, needs_netns in (("single", single, False), ("ddp", ddp_run, True), ("swarm", swarm_runs, False),
                                  ("robustness", robustness, False), ("honest", honest_sweep, False),
                                  ("hivemind", hivemind_run, True),
                                  ("wan", wan, True)):
        if name in only and (netns or not needs_netns):
            part(name, fn)
        if r.get("bytes_per_mtok_ddp") and r.get("bytes_per_mtok_swarm"):
            r["comm_reduction"] = round(r["bytes_per_mtok_ddp"] / r["bytes_per_mtok_swarm"], 1)
            for s in r["swarm"].values():
                s["comm_reduction"] = round(r["bytes_per_mtok_ddp"] / s["bytes_per_mtok"], 1)
    for k in KEYS:
        r.setdefault(k, None)
    r["bench_seconds"] = round(time.time() - t_all)
    results.mkdir(parents=True, exist_ok=True)
    plot(r, results)
    (results / "latest.json").write_text(json.dumps(r, indent=1))
    (results / "REPORT.md").write_text(report(r))
    print((results / "REPORT.md").read_text())
    if not r["errors"]:
        shutil.rmtree(work, ignore_errors=True)  # on a failure its logs stay for a look
    else:
        sys.exit(f"Error: {len(r['errors'])} part(s) failed: {', '.join(r['errors'])}")


if __name__ == "__main__":
    main()
