"""rounds/replay.py on its own: a round recorded as the worker records it (steps trained ahead on the
previous theta_local, theta_global put under them, more steps, top-k or 8-bit), sealed, parsed and
re-run as the coordinator re-runs it: bit-equal with the same threads, near with other threads, far
for a contribution that is not the record's; records that lie about their leases are refused."""

import hashlib
import subprocess
import sys

import pytest
import torch
from swarm import (
    coordinator,
    hostile_worker,
    join_address,
    ledger,
    status_and_metrics,
    wait_until,
    worker,
)

from gptswarm.mingpt_core.data import Batches, Shard, text_shards
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.trainer import TrainConfig, Trainer
from gptswarm.rounds import DEFAULT_TOPK
from gptswarm.rounds.codecs import ErrorFeedback
from gptswarm.rounds.hivemind_ext import CODECS
from gptswarm.rounds.outer import pseudo_gradient
from gptswarm.rounds.replay import (
    TOLERANCE,
    Recorder,
    ReplayError,
    Witness,
    claims_match,
    distance,
    parse,
    rerun,
)
from gptswarm.rounds.theta import theta_views
from gptswarm.worker.sync import into_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 400
BLOCK, BATCH = 32, 4


def run_round(tmp_path, codec_name, ahead=3, after=4, **train_kw):
    """A worker's round as worker/loop.py runs it: 3 steps trained ahead from the previous round's
    theta_local, theta_global put under them, 4 more steps on a second lease (or ahead and after); sealed. Returns what
    the coordinator needs to replay it and the contribution the worker sent (through the codec)."""
    chars = sorted(set(TEXT))
    shard_set = text_shards([chars.index(c) for c in TEXT], len(chars), BLOCK, shard_tokens=2048)
    shards = shard_set.split("train")
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt-nano", len(chars), BLOCK)
    model = GPT(cfg)
    train = TrainConfig(batch_size=BATCH, max_iters=1000, warmup_iters=2, **train_kw)
    trainer = Trainer(model, train)
    feedback = ErrorFeedback(DEFAULT_TOPK) if codec_name == "topk" else None
    old = {k: v.clone() for k, v in theta_views(model).items()}  # the previous round's theta_global
    leases = {"lease-a": shards[0].tokens, "lease-b": shards[1].tokens}
    batches = {k: Batches([Shard(t, "train")], shard_set, BLOCK, BATCH, seed=7 + i)
               for i, (k, t) in enumerate(leases.items())}
    for _ in range(5):  # the previous round: the optimizer has moments
        trainer.train_step(*batches["lease-a"].next())
    if feedback is not None:
        feedback.sparsify(pseudo_gradient(old, theta_views(model)))
        feedback.commit()
    sent_before = {k: v.clone() for k, v in theta_views(model).items()}
    rec = Recorder(tmp_path / "replay")
    rec.start(trainer, base=sent_before)  # Exchanger.begin: what follows is trained ahead
    for _ in range(ahead):
        rec.step("lease-a", batches["lease-a"])
        trainer.train_step(*batches["lease-a"].next())
    theta_global = {k: v + 0.01 * torch.randn_like(v) for k, v in old.items()}  # the round's outer step
    into_model(model, theta_global, carry_from=sent_before)
    trainer.step = 40
    rec.rebase(trainer.step)
    for _ in range(after):
        rec.step("lease-b", batches["lease-b"])
        trainer.train_step(*batches["lease-b"].next())
    grad = pseudo_gradient(theta_global, theta_views(model))
    residual = dict(feedback.residual) if feedback is not None else None
    if feedback is not None:
        grad = feedback.sparsify(grad)
    commit = rec.seal(3, trainer, residual)
    names = list(theta_global)
    flat = torch.cat([grad[n].reshape(-1) for n in names])
    sizes = [min(4096, flat.numel() - i) for i in range(0, flat.numel(), 4096)]
    send = CODECS[codec_name](DEFAULT_TOPK)[0]
    from hivemind.compression import CompressionInfo

    from gptswarm.rounds.codecs import decode
    sent = torch.cat([decode(send.compress(p, CompressionInfo.from_tensor(p)), p.numel()).reshape(-1)
                      for p in flat.split(sizes)])
    return dict(path=rec.path(3), commit=commit, theta_global=theta_global, cfg=cfg, train=train, shard_set=shard_set,
                tokens=leases, codec=send, sizes=sizes, sent=sent,
                fraction=DEFAULT_TOPK if codec_name == "topk" else None)


def replay(r, blob=None):
    tensors, meta = parse(blob if blob is not None else r["path"].read_bytes())
    torch.manual_seed(123)  # the model's init is overwritten: nothing depends on it
    theta = {k: r["theta_global"][k] for k in sorted(r["theta_global"])}  # in a file's order, as a job loads it
    return rerun(tensors, meta, theta, model=GPT(r["cfg"]), train=r["train"], shard_set=r["shard_set"],
                 tokens=r["tokens"], sparsify_fraction=r["fraction"], codec=r["codec"], part_sizes=r["sizes"])


@pytest.mark.parametrize("codec", ["8bit", "topk", "none"])
def test_replay_is_bit_equal_on_the_same_threads(tmp_path, codec):
    r = run_round(tmp_path, codec)
    assert hashlib.sha256(r["path"].read_bytes()).hexdigest() == r["commit"]
    again = replay(r)
    assert torch.equal(again, r["sent"]), distance(r["sent"], again)
    assert distance(r["sent"], again) == 0.0
    # what the lazy, partial and freeriding workers send is far from what their records make
    for factor in (0.1, 0.5, 0.0, 0.9):
        assert distance(r["sent"] * factor, again) > 5 * TOLERANCE
    assert distance(-r["sent"], again) > 1.5


def test_a_memory_lean_round_replays_bit_equal(tmp_path):
    """8-bit AdamW state and activation checkpointing (the lean worker's, plan.py) are in the record: the
    replay makes them again, bit for bit."""
    r = run_round(tmp_path, "8bit", optimizer="adamw8bit", checkpointing=True)
    assert torch.equal(replay(r), r["sent"])
    tensors, meta = parse(r["path"].read_bytes())
    assert meta["optimizer"] == "adamw8bit" and any(k.endswith("exp_avg_codes") for k in tensors)


def test_replay_with_other_threads_is_within_tolerance(tmp_path):
    """A worker with 2 threads, replayed with 1: not bit-equal (the order of sums differs), within TOLERANCE."""
    code = (f"import torch, sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); torch.set_num_threads(2)\n"
            "from pathlib import Path; import test_replay as t\n"
            f"r = t.run_round(Path({str(tmp_path)!r}), '8bit')\n"
            f"torch.save(r['sent'], Path({str(tmp_path)!r}) / 'sent.pt')")
    subprocess.run([sys.executable, "-c", code], check=True)
    torch.set_num_threads(1)
    try:
        r = run_round(tmp_path / "here", "8bit")
        sent2 = torch.load(tmp_path / "sent.pt")
        r["path"] = tmp_path / "replay" / "round-000003.safetensors"  # the 2-thread worker's record
        again = replay(r)
    finally:
        torch.set_num_threads(2)
    d = distance(sent2, again)
    assert d < TOLERANCE, d


def test_records_that_do_not_fit_are_refused(tmp_path):
    r = run_round(tmp_path, "8bit")
    blob = r["path"].read_bytes()
    tensors, meta = parse(blob)
    assert claims_match(meta, {"lease-a": 3 * BATCH * BLOCK, "lease-b": 4 * BATCH * BLOCK}, BATCH * BLOCK) == ""
    assert "claimed 1024" in claims_match(meta, {"lease-a": 3 * BATCH * BLOCK, "lease-b": 8 * BATCH * BLOCK},
                                          BATCH * BLOCK)
    assert "claimed nothing" in claims_match(meta, {"lease-b": 4 * BATCH * BLOCK}, BATCH * BLOCK)
    with pytest.raises(ReplayError, match="not a replay record"):
        parse(b"garbage" * 10)
    with pytest.raises(ReplayError, match="not the worker's"):
        rerun(tensors, meta, r["theta_global"], model=GPT(r["cfg"]), train=r["train"], shard_set=r["shard_set"],
              tokens={"lease-a": r["tokens"]["lease-a"]}, sparsify_fraction=None, codec=r["codec"],
              part_sizes=r["sizes"])
    tensors["optim.0.exp_avg"] = torch.zeros(3)
    with pytest.raises(ReplayError, match="optimizer state"):
        rerun(tensors, meta, r["theta_global"], model=GPT(r["cfg"]), train=r["train"], shard_set=r["shard_set"],
              tokens=r["tokens"], sparsify_fraction=None, codec=r["codec"], part_sizes=r["sizes"])


def test_witness_keeps_the_drawn_members_values(tmp_path):
    total = 10_000
    w = Witness({"w1"}, total, sample=500)
    contributions = {"w1": torch.randn(total), "w2": torch.randn(total)}
    sizes = [4096, 4096, total - 8192]
    w.bind([None, "w1", "w2"], sizes)
    for sender, key in ((1, "w1"), (2, "w2")):
        for j, part in enumerate(contributions[key].split(sizes)):
            if not (key == "w1" and j == 2):
                w.take(sender, j, part)
    assert w.sample("w1") is None  # a part missing
    w.take(1, 2, contributions["w1"][8192:])
    assert torch.equal(w.sample("w1"), contributions["w1"][w.indices])
    assert w.sample("w2") is None  # not drawn


def test_a_real_swarm_verifies_honest_rounds_and_quarantines_a_worker_its_replay_refutes(tmp_path):
    """Every member drawn (--replay-fraction 1), scoring off (replay alone): the honest workers' replays
    pass bit-equal and their credit is verified; a worker that sends half of what it trained (claiming
    all of it) fails its first replay, loses its unverified credit and is quarantined. Visible on the
    status page, in /metrics and in the event log."""
    sd = tmp_path / "state"
    coord = coordinator(sd, "--aggregation", "mean", "--score-fraction", "0", "--replay-fraction", "1")
    procs = [coord]
    try:
        join = join_address(coord)
        procs += [worker(join, "honest-1"), worker(join, "honest-2")]
        wait_until(lambda: len(ledger(sd, "SELECT DISTINCT worker_id FROM replays WHERE state = 'passed'")) == 2,
                   240, "a passed replay of each honest worker")
        procs.append(hostile_worker(join, "cheat", "partial"))
        wait_until(lambda: ledger(sd, "SELECT 1 FROM workers WHERE name = 'cheat' AND quarantined_at IS NOT NULL"),
                   240, "the cheat's quarantine")
        shown, metrics = status_and_metrics(coord)
    finally:
        for p in procs:
            p.kill()
    replays = ledger(sd, "SELECT w.name, r.state, r.distance, r.detail FROM replays r JOIN workers w "
                         "ON w.id = r.worker_id ORDER BY r.round")
    honest = [r for r in replays if r[0].startswith("honest")]
    assert honest and all(state in ("passed", "requested", "uploaded") for _, state, _, _ in honest), honest
    assert all(d == 0.0 for _, state, d, _ in honest if state == "passed"), honest  # same threads: bit-equal
    cheat = [r for r in replays if r[0] == "cheat" and r[1] not in ("requested", "uploaded")]
    assert cheat and cheat[0][1] == "failed" and cheat[0][2] > 0.3, cheat
    (reason, credited, verified), = ledger(sd, "SELECT quarantine_reason, tokens_credited, tokens_verified "
                                               "FROM workers WHERE name = 'cheat'")
    assert "replay" in reason and credited == 0 and verified == 0, (reason, credited, verified)
    for name in ("honest-1", "honest-2"):
        (verified, in_rows), = ledger(sd, "SELECT w.tokens_verified, (SELECT SUM(verified) FROM contributions c "
                                          "WHERE c.worker_id = w.id) FROM workers w WHERE w.name = ?", (name,))
        assert verified > 0 and verified == in_rows
        assert 0 < shown[name]["tokens_verified"] <= verified  # the page's snapshot may be a replay behind
    assert shown["cheat"]["tokens_verified"] == 0
    assert 'gptswarm_replays_total{outcome="passed"}' in metrics
    assert 'gptswarm_replays_total{outcome="failed"}' in metrics
    assert ledger(sd, "SELECT 1 FROM events e JOIN workers w ON w.id = e.worker_id WHERE w.name = 'cheat' "
                      "AND e.kind = 'replay_failed'")


def test_uploads_are_checked_against_the_commitment_and_bounded(tmp_path):
    """The coordinator's side of an upload (coordinator/replays.py) with a real ledger: a record is
    taken only for a replay that waits for it, only if it is what was committed to, and only up to
    the size a record of the model can have; each refusal ends the replay as it deserves."""
    from gptswarm.coordinator.ledger import Ledger
    from gptswarm.coordinator.replays import Replays
    from gptswarm.proto import gptswarm_pb2 as pb

    led = Ledger(tmp_path / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0)
    led.add_shards([("sha0", 100)])
    led.start_round(0, "h0")
    ids = [led.add_worker(name=n, device="cpu", peer_id="peer-" + n, current_round=0, round_started=False)[0]
           for n in ("good", "liar", "huge", "empty")]
    led.commit_round(0, included={w: 100 for w in ids}, excluded={}, theta_hash="h1", averaging_seconds=1)
    replays = Replays(state_dir=tmp_path, ledger=led, fraction=1.0, deadline=60, run={}, record_bytes=1000)
    # not started: no runner, so what receive() queues stays queued
    witness = replays.witness(ids, 10)
    witness.bind([None, *ids], [10])
    for i in range(len(ids)):
        witness.take(1 + i, 0, torch.arange(10.0))
    record = b"a record" * 10
    commits = {w: hashlib.sha256(record).hexdigest() for w in ids}
    assert replays.draw(0, witness, ids, commits, {"w": torch.zeros(3)}) == ids

    def chunks(data, round_=0):
        return [pb.ReplayChunk(round=round_, data=data[i:i + 7]) for i in range(0, max(1, len(data)), 7)]
    good, liar, huge, empty = ids
    assert replays.receive(good, chunks(record, round_=5)) == (False,
                                                              "no replay of round 5 waits for a record of yours")
    assert replays.receive(good, chunks(record)) == (True, "")
    assert replays.receive(good, chunks(record))[0] is False  # once
    assert replays.queue == [(0, good)] and led.replay_row(0, good)["state"] == "uploaded"
    assert "not the one committed to" in replays.receive(liar, chunks(record + b"!"))[1]
    assert "at most 1000 bytes" in replays.receive(huge, chunks(b"x" * 2000))[1]
    assert replays.receive(empty, chunks(b""))[0] is False
    states = {r["worker_id"]: r["state"] for r in led.query("SELECT worker_id, state FROM replays")}
    assert states == {good: "uploaded", liar: "failed", huge: "failed", empty: "unanswered"}
    assert led.quarantine_reason(liar) and led.quarantine_reason(huge) and not led.quarantine_reason(empty)
    assert led.worker(empty)["tokens_credited"] == 0 and led.worker(good)["tokens_credited"] == 100


def test_a_replay_job_ends_with_its_coordinator(tmp_path):
    """A replay job whose coordinator is killed (SIGKILL: no close() to kill it) ends by itself."""
    import psutil

    child = ("import os, sys, time; from gptswarm.coordinator.replay_job import die_with_parent; "
             "die_with_parent(int(sys.argv[1])); time.sleep(120)")
    parent = (f"import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); "
              "print(p.pid, flush=True); import time; time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    assert psutil.pid_exists(pid)
    proc.kill()
    proc.wait()
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
               "the orphaned job's end")
