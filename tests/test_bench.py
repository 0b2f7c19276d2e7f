"""The benchmark harness keeps working: `python -m bench --quick` runs every part and writes its
figures, report and plots. (Benchmarks are not tests: nothing here looks at a timing or a loss
value beyond its being a finite number.)"""

import json
import math
import subprocess
import sys

import psutil
import pytest

from bench.netns import available
from bench.report import KEYS  # the flat keys latest.json must have
from conftest import REPO


def bench_processes(before, work):
    """Processes started since `before` (pids) that belong to a benchmark run in `work`: its
    coordinators, workers and trainers (their command lines name it) and hivemind daemons."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        if p.info["pid"] in before:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if str(work) in cmd or p.info["name"] == "p2pd" or "bench.hostile_worker" in cmd:
            found.append((p.info["pid"], cmd[:200]))
    return found


@pytest.mark.timeout(900)
def test_bench_quick_writes_every_figure(tmp_path, shakespeare_path):
    before = set(psutil.pids())
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--text", str(shakespeare_path), "--results",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=880)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # nothing it started outlives it: no worker, coordinator, trainer or hivemind daemon
    assert bench_processes(before, tmp_path) == []
    res = json.loads((tmp_path / "latest.json").read_text())
    for k in ("machine", "date", "tokens", "model", "versions"):
        assert res[k], k
    measured = KEYS if available() else ("loss_single", "loss_swarm", "bytes_per_mtok_swarm", "compute_utilization",
                                         "join_seconds")
    for k in measured:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert set(KEYS) <= set(res)
    assert 0 < res["compute_utilization"] <= 1
    if available():
        # bytes were counted on the wire: DDP's fp32 gradient all-reduce every step sends more than
        # gptswarm's one compressed pseudo-gradient per round
        assert res["bytes_per_mtok_ddp"] > res["bytes_per_mtok_swarm"]
        assert res["comm_reduction"] == pytest.approx(res["bytes_per_mtok_ddp"] / res["bytes_per_mtok_swarm"], rel=0.01)
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Goals" in report and "Loss parity" in report and "not measured yet" not in report
    # the frontier: each configuration with its loss, bytes and utilization, the dominated ones apart
    assert set(res["swarm"]) == {"fp16", "topk 3%"}
    for s in res["swarm"].values():
        assert s["bytes_per_mtok"] > 0 and math.isfinite(s["loss_swarm"]) and s["compute_utilization_per_worker"]
    assert res["swarm"]["topk 3%"]["bytes_per_mtok"] < res["swarm"]["fp16"]["bytes_per_mtok"] / 3
    assert "gptswarm, topk 3%" in report and "(frontier)" in report
    # honest-only swarms across configurations: the robust rule flags nobody and fails no round
    honest = json.loads((tmp_path / "honest.json").read_text())
    assert res["honest"]["configurations"] == len(honest["runs"]) == 3
    assert res["honest"]["flagged"] == res["honest"]["failed_rounds"] == res["honest"]["parts_lost"] == 0
    for row in honest["runs"]:
        assert set(row["robust"]["val_loss"]) == {"6"} and math.isfinite(row["mean"]["val_loss"]["6"])
    assert "Honest swarms" in report
    for png in ("loss.png", "comm.png", "frontier.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "tmp").exists()  # the work folder is cleaned up after a good run


@pytest.mark.timeout(960)
def test_scale_bench_measures_each_size(tmp_path, shakespeare_path):
    """`python -m bench.scale` with small sizes: a real coordinator and simulated workers in two
    processes; every figure of every size, the projection, and nothing left running."""
    before = set(psutil.pids())
    r = subprocess.run([sys.executable, "-m", "bench.scale", "--workers", "2,3", "--per-process", "2", "--rounds", "2",
                        "--reducers", "0,2",
                        "--steps-per-round", "20", "--text", str(shakespeare_path), "--results", str(tmp_path),
                        "--workdir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert bench_processes(before, tmp_path) == []
    res = json.loads((tmp_path / "scale.json").read_text())
    assert [s["workers"] for s in res["sizes"]] == [2, 3]
    for s in res["sizes"]:
        assert s["rounds_measured"] == 2 and s["every_round_included_every_worker"], s
        assert set(s["parts_seconds"]) == {"group", "scoring", "matchmaking", "all_reduce", "outer_step", "checkpoint",
                                           "commit"}
        assert all(v >= 0 for v in s["parts_seconds"].values())
        assert s["heartbeat_ms"]["calls"] > 0 and s["lease_ms"]["calls"] > 0 and s["heartbeat_ms"]["p99"] > 0
        assert s["bytes_in_per_round"] > 0 and s["bytes_out_per_round"] > 0 and s["coordinator_rss_mb"] > 0
    # three workers send half as much again as two, to the coordinator and back
    assert res["sizes"][1]["bytes_out_per_round"] == pytest.approx(1.5 * res["sizes"][0]["bytes_out_per_round"], rel=0.1)
    # the same sizes on two reducer nodes: each node reduced every measured round, about half of the bytes each
    assert [s["workers"] for s in res["with_reducer_nodes"]] == [2, 3]
    for s in res["with_reducer_nodes"]:
        assert s["every_round_included_every_worker"], s
        assert [n["name"] for n in s["reducer_nodes"]] == ["r1", "r2"]
        for node in s["reducer_nodes"]:
            assert node["rounds"] == 2 and node["cpu_seconds_per_round"] > 0 and node["bytes_in_per_round"] > 0
        ins = [node["bytes_in_per_round"] for node in s["reducer_nodes"]]
        assert min(ins) > 0.8 * max(ins)
    rows = res["projection"]["rows"]
    assert {(row["model"].split()[0], row["link_gbit"]) for row in rows} == {("gpt2", 1), ("gpt2", 10),
                                                                            ("gpt-mini", 1), ("gpt-mini", 10)}
    for row in rows:
        assert row["max_workers_with_overlap"] >= row["max_workers_without_overlap"] >= 0
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reduce_bench_measures_a_real_reducer(tmp_path):
    """`python -m bench.reduce --quick`: one real RoundReducer, senders over real hivemind streams in a
    process of their own; every round reduced, every sender given the same bytes, no honest member
    flagged, the floor beside it, and nothing left running."""
    before = set(psutil.pids())
    out = tmp_path / "reduce.json"
    r = subprocess.run([sys.executable, "-m", "bench.reduce", "--quick", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert bench_processes(before, tmp_path) == []
    res = json.loads(out.read_text())
    assert {(run["aggregation"], run["senders"]) for run in res["runs"]} == {("robust", 2), ("mean", 2)}
    for run in res["runs"]:
        for row in (run, run["first_round"]):
            assert row["ok"] and row["identical"] and row["flagged"] == 0 and row["left_out"] == 0, row
            assert len(row["replies"]) == 1 and row["replies"][0] > 1  # every part, to every sender
            assert row["reducer_cpu_s"] > 0 and math.isfinite(row["reducer_ns_per_value_sender"])
    assert res["floor"]["8bit"]["decode_ns"] > 0 and res["floor"]["8bit"]["add_ns"] > 0
