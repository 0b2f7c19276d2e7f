"""Replays on the coordinator (rounds/replay.py has the idea; docs/architecture.md "Credit for work
done"): a secret random `fraction` of each round's members is drawn before the reduce, the reducer
keeps a sample of their contributions (Witness), and, once the round committed, each drawn member
that was credited is asked for its record (RoundResult.replay). Its upload must be the record it
committed to; a job, one process per replay (`python -m gptswarm.coordinator.replay_job`, niced, on
the operator's machine, never a volunteer's), re-runs the round from it and measures the distance to
what the worker sent. The ledger keeps the outcome (coordinator/ledger/replays.py): passed (the
round's credit is verified), failed (every unverified credit of the worker's is taken back and it is
quarantined), unanswered (no record by the deadline: that round's credit is taken back).

A job holds a copy of theta_global(round) on disk (state_dir/replays/round-N/), so at most
MAX_OPEN rounds have replays open at once; beyond, no member is drawn (counted: `skipped`).
Rounds reduced by reducer nodes draw nobody (the coordinator sees none of their parts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from gptswarm.coordinator.ledger import Ledger
from gptswarm.rounds.replay import TOLERANCE, Witness
from gptswarm.states import ReplayState

log = logging.getLogger("gptswarm.coordinator")
MAX_OPEN = 4  # rounds with replays open at once (each keeps its theta_global on disk)
POLL = 0.5  # seconds between the runner's looks at its queue and the deadlines
JOB_TIMEOUT = 3600.0  # seconds one replay may run


class Replays:
    """fraction: of the members drawn each round; deadline: seconds a drawn worker has to upload its
    record; run: what the jobs need of the run ({model, train, compression, topk_fraction,
    tokens_per_step, shard_set}); record_bytes: the largest record a worker of this model makes;
    train_shards: the run's training shards (a job gets those its leases cut).

    Threads: witness() and draw() run on the round loop; receive() on gRPC threads; the runner
    thread runs the jobs and the deadlines; close() on the coordinator's. `queue` (uploaded jobs),
    `skipped` and `proc` (the job under way, killed by close()) are read and written under
    self.lock; a job's directory is written by draw() before the ledger asks for its record, then
    read by the runner alone; the upload is written by receive() alone and handed over through the
    queue."""

    def __init__(self, *, state_dir: Path, ledger: Ledger, fraction: float, deadline: float, run: Mapping[str, Any],
                 record_bytes: int, train_shards: list | None = None) -> None:
        self.dir = Path(state_dir) / "replays"
        self.ledger, self.fraction, self.deadline, self.run = ledger, fraction, deadline, dict(run)
        self.train_shards = train_shards or []
        self.record_bytes = record_bytes
        self.lock = threading.Lock()
        self.queue: list[tuple[int, str]] = []
        self.proc: subprocess.Popen | None = None  # the job under way
        self.skipped = 0  # rounds in which members would have been drawn but MAX_OPEN rounds were open
        self.stop = threading.Event()
        shutil.rmtree(self.dir, ignore_errors=True)  # the jobs of a coordinator that stopped are gone ...
        ledger.lose_open_replays("the coordinator restarted before the replay")  # ... and said so
        self.thread: threading.Thread | None = None

    def start(self) -> Replays:
        """Run the jobs and the deadlines (on a thread of their own), until close()."""
        self.thread = threading.Thread(target=self._loop, name="replays", daemon=True)
        self.thread.start()
        return self

    def skipped_rounds(self) -> int:
        with self.lock:
            return self.skipped

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            proc = self.proc
        if proc is not None:
            proc.kill()  # a job under way ends as lost (nobody's fault)
        if self.thread is not None:
            self.thread.join(timeout=5)

    # --- the round loop ---

    def witness(self, members: Iterable[str], total: int) -> Witness | None:
        """Before the reduce: the members drawn for a replay (a secret draw), and the Witness that keeps
        their samples; None if nobody is drawn."""
        drawn = {w for w in members if secrets.randbelow(1 << 30) < self.fraction * (1 << 30)}
        if not drawn:
            return None
        if len(self._open_rounds()) >= MAX_OPEN:
            with self.lock:
                self.skipped += 1
            return None
        return Witness(drawn, total)

    def draw(self, round_: int, witness: Witness, credited: Iterable[str], commits: Mapping[str, str],
             theta: Mapping[str, torch.Tensor]) -> list[str]:
        """After the reduce, before the commit: the drawn members that are credited in the round, sent
        every part and committed to a record get a job, and the ledger asks for their records. Returns
        their worker ids."""
        chosen = [w for w in credited if w in witness.drawn and commits.get(w) and witness.sample(w) is not None]
        if not chosen:
            return []
        d = self.dir / f"round-{round_:06d}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in theta.items()}, str(d / "theta.safetensors"))
        for w in chosen:
            job = d / w
            job.mkdir(exist_ok=True)
            claims = self.ledger.round_claims(round_, w)
            for _, idx in claims.values():  # the shards its leases cut, and no other (a dataset may be large)
                if 0 <= idx < len(self.train_shards):
                    np.save(job / f"shard-{idx}.npy", self.train_shards[idx].tokens)
            torch.save({"indices": witness.indices, "values": witness.sample(w)}, job / "sample.pt")
            (job / "job.json").write_text(json.dumps(dict(self.run, round=round_, worker_id=w, commit=commits[w],
                                                          part_sizes=witness.part_sizes,
                                                          claims={k: list(v) for k, v in claims.items()})))
        self.ledger.request_replays(round_, {w: commits[w] for w in chosen}, self.deadline)
        log.info("round %d: replaying %d contribution(s): %s", round_, len(chosen), ", ".join(chosen))
        return chosen

    def dropped(self, round_: int) -> None:
        """The round did not commit: its replays end (nothing was credited)."""
        for w in self._jobs(round_):
            self.ledger.end_replay(round_, w, ReplayState.LOST, "the round did not commit")
        shutil.rmtree(self.dir / f"round-{round_:06d}", ignore_errors=True)

    # --- gRPC threads ---

    def receive(self, worker_id: str, chunks: Iterable[Any]) -> tuple[bool, str]:
        """A worker's upload of its record: (accepted, why not). Refused before a byte is read from a
        worker that no replay waits for (an upload stream holds a server thread while it lasts)."""
        if not self.ledger.replays_waiting(worker_id):
            return False, "no replay waits for a record of yours"
        try:
            return self._receive(worker_id, chunks)
        except OSError as e:  # its job ended meanwhile (the deadline), or our disk
            return False, f"the record could not be kept: {e.strerror or e}"

    def _receive(self, worker_id: str, chunks: Iterable[Any]) -> tuple[bool, str]:
        round_: int | None = None
        size, h, tmp = 0, hashlib.sha256(), None
        f = None
        try:
            for chunk in chunks:
                if round_ is None or f is None:
                    round_ = int(chunk.round)
                    row = self.ledger.replay_row(round_, worker_id)
                    if row is None or row["state"] != ReplayState.REQUESTED:
                        return False, f"no replay of round {round_} waits for a record of yours"
                    tmp = self.dir / f"round-{round_:06d}" / worker_id / "record.part"
                    f = open(tmp, "wb")  # noqa: SIM115 (closed in finally)
                elif chunk.round != round_:
                    return False, "a record's chunks name different rounds"
                size += len(chunk.data)
                if size > self.record_bytes:
                    self._end(round_, worker_id, ReplayState.FAILED, f"a record of more than {self.record_bytes} bytes")
                    return False, f"a record is at most {self.record_bytes} bytes for this model"
                h.update(chunk.data)
                f.write(chunk.data)
        finally:
            if f is not None:
                f.close()
        if round_ is None or tmp is None:
            return False, "an empty upload"
        row = self.ledger.replay_row(round_, worker_id)
        if row is None:
            return False, "the replay is gone"
        if size == 0:
            self._end(round_, worker_id, ReplayState.UNANSWERED, "the worker has no record of the round")
            return False, "no record: the round's credit is taken back"
        if h.hexdigest() != row["commit_hash"]:
            self._end(round_, worker_id, ReplayState.FAILED, "the record uploaded is not the one committed to")
            return False, "the record's sha256 is not the one committed to in the round"
        tmp.replace(tmp.with_name("record.safetensors"))
        if not self.ledger.replay_uploaded(round_, worker_id):
            return False, "the replay ended meanwhile"
        with self.lock:
            self.queue.append((round_, worker_id))
        return True, ""

    # --- the runner thread ---

    def _loop(self) -> None:
        while not self.stop.wait(POLL):
            try:
                for row in self.ledger.overdue_replays():
                    self._end(row["round"], row["worker_id"], ReplayState.UNANSWERED,
                              f"no record within {self.deadline:.0f} s of the request")
                with self.lock:
                    job = self.queue.pop(0) if self.queue else None
                if job is not None:
                    self._replay(*job)
            except Exception:  # noqa: BLE001 (the runner goes on; the job is lost, not the coordinator)
                log.exception("replay runner")

    def _replay(self, round_: int, worker_id: str) -> None:
        job = self.dir / f"round-{round_:06d}" / worker_id
        t0 = time.time()
        cmd = [sys.executable, "-m", "gptswarm.coordinator.replay_job", str(job), str(os.getpid())]  # it ends with us
        if hasattr(os, "nice"):
            cmd = ["nice", "-n", "10", *cmd]
        stderr = ""
        try:
            with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
                with self.lock:
                    self.proc = proc
                    if self.stop.is_set():  # close() came first
                        proc.kill()
                try:
                    _, stderr = proc.communicate(timeout=JOB_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stderr = "it ran past its time"
            result = json.loads((job / "result.json").read_text()) if proc.returncode == 0 else None
        except (OSError, ValueError) as e:
            result, stderr = None, str(e)
        finally:
            with self.lock:
                self.proc = None
        if self.stop.is_set():
            return  # closing: the ledger's open replays are lost at the next start
        if result is None:
            why = (stderr.strip().splitlines() or ["it did not finish"])[-1][:300]
            self._end(round_, worker_id, ReplayState.LOST, f"the replay job failed on the coordinator: {why}")
            return
        seconds = result.get("cpu_seconds", time.time() - t0)
        if result.get("error"):
            self._end(round_, worker_id, ReplayState.FAILED, result["error"], seconds=seconds)
            return
        dist = float(result["distance"])
        ok = dist <= TOLERANCE
        detail = (f"what it sent is {dist:.2e} from what its record makes (tolerance {TOLERANCE}"
                  + (", bit-equal" if result.get("equal") else "") + ")")
        self._end(round_, worker_id, ReplayState.PASSED if ok else ReplayState.FAILED, detail, distance=dist,
                  seconds=seconds)
        (log.info if ok else log.warning)("round %d: replay of %s %s: %s", round_, worker_id,
                                          ReplayState.PASSED if ok else "FAILED", detail)

    def _end(self, round_: int, worker_id: str, state: str, detail: str, **kw: Any) -> None:
        self.ledger.end_replay(round_, worker_id, state, detail, **kw)
        shutil.rmtree(self.dir / f"round-{round_:06d}" / worker_id, ignore_errors=True)
        d = self.dir / f"round-{round_:06d}"
        if d.is_dir() and not any(p.is_dir() for p in d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)

    def _jobs(self, round_: int) -> list[str]:
        d = self.dir / f"round-{round_:06d}"
        return [p.name for p in d.iterdir() if p.is_dir()] if d.is_dir() else []

    def _open_rounds(self) -> list[Path]:
        return [p for p in self.dir.glob("round-*") if p.is_dir()] if self.dir.is_dir() else []
