"""The worker's round loop.

join -> run config -> hivemind peer -> theta_global from the latest checkpoint -> loop:
  lease a shard -> inner AdamW steps with the shared Trainer -> when the coordinator says the round
  is averaging: pseudo-gradient = theta_global - theta_local -> token-weighted average through
  hivemind -> outer Nesterov step (bit-identical on every peer) -> hash check against the
  coordinator (resynchronize if different) -> report the shards the average included.
A worker that joins while a round is under way waits for the next one.
"""

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from gptswarm.averaging import SwarmAverager, start_dht
from gptswarm.coordinator.run import load_theta
from gptswarm.errors import UserError
from gptswarm.mingpt_core import checkpoint
from gptswarm.mingpt_core.data import Batches, Shard, ShardSet, decode_shard
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.trainer import Trainer, TrainConfig, limit_vram, resolve_device, resolve_dtype
from gptswarm.outer import outer_step, pseudo_gradient
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.worker.client import CoordinatorClient, Stopped
from gptswarm.worker.control import ControlServer, default_state_dir
from gptswarm.worker.idle import CpuProbe, IdleDetector, NvmlProbe

log = logging.getLogger("gptswarm.worker")
FAULT = os.environ.get("GPTSWARM_TEST_FAULT", "")  # test hook: "nan-gradient" sends a poisoned contribution


def describe_device(device):
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Worker:
    def __init__(self, join, token, device="auto", name=None, p2p_listen=None, announce_host=None, state_dir=None,
                 schedule=None, idle_only=False, max_hours=None, max_vram=None):
        self.device = resolve_device(device)
        limit_vram(self.device, max_vram)
        self.state_dir = Path(state_dir or default_state_dir())
        self.schedule, self.max_hours = schedule, max_hours
        self.idle = None
        if idle_only:
            self.idle = IdleDetector(gpu_probe=NvmlProbe(self.device.index or 0) if self.device.type == "cuda" else None,
                                     cpu_probe=CpuProbe() if self.device.type != "cuda" else None)
        self.user_paused = (self.state_dir / "paused").exists()  # a pause survives a restart
        self.finish_requested = threading.Event()
        self.started_at = time.time()
        self._pause_checked, self._pause = 0.0, ""
        self.name = name or platform.node() or "volunteer"
        self.client_mode = p2p_listen is None
        self.p2p_listen, self.announce_host = p2p_listen, announce_host
        self.client = CoordinatorClient(join, token, on_wait=self._on_wait)
        self.stopping = threading.Event()
        self.state, self.reason = "joining", ""
        self.round, self.round_tokens, self.tokens_contributed = 0, 0, 0
        self.view = None  # the last HeartbeatResponse
        self.shard = None  # the shard being trained: dict(lease_id, tokens, steps_needed, steps_done, batches)
        self.completed = []  # (lease_id, tokens, loss) trained in this round, reported after the average
        self.lost = set()  # lease ids the coordinator no longer holds for us
        self.losses = []
        self.tps = 0.0
        # compute utilization: seconds inside training steps, from the first step to the last round
        # this worker finished (time waiting, averaging, leasing and loading counts against it)
        self.compute_seconds, self.first_step_at, self.last_sync_at = 0.0, None, None
        self.dht = self.averager = self.hb_thread = self.control = None

    # --- public ---

    def request_stop(self):
        """Stop soon: give the leases back and leave (what Ctrl+C does)."""
        self.stopping.set()
        self.client.stop.set()

    def run(self):
        try:
            self.control = ControlServer(self.state_dir, self._control)
            self._bootstrap()
            self._loop()
        except Stopped:
            pass
        finally:
            self._teardown()

    # --- setup and teardown ---

    def _bootstrap(self):
        self.client.connect()
        cfg = self._resume_session()
        if cfg is None:
            joined = self.client.join(self.name, describe_device(self.device), self.client_mode)
            self.worker_id = joined.worker_id
            cfg = self.client.call("GetRunConfig", pb.RunConfigRequest())
            self._save_session(cfg.run_id)
        self.cfg = cfg
        self.client.close()  # hivemind forks its processes: no gRPC objects around while it starts
        self.dht = start_dht(self.p2p_listen or "0.0.0.0:0", cfg.initial_peers, self.client_mode, self.announce_host)
        self.model_config = GPTConfig.from_dict(json.loads(cfg.model_config_json))
        self.shard_info = ShardSet([], **{k: v for k, v in json.loads(cfg.shards_json).items()
                                          if k in ("vocab_size", "layout", "example_len", "loss_start")})
        template = {k: v for k, v in GPT(self.model_config).state_dict().items() if k != checkpoint.TIED}
        # the averager always follows: the coordinator leads every round's group, so no group can
        # form without it (a reachable worker still serves the DHT)
        self.averager = SwarmAverager(self.dht, template, cfg.averaging_prefix, cfg.compression, client_mode=True,
                                      matchmaking_time=cfg.matchmaking_time or 5.0)
        self.client.connect()
        train = TrainConfig.from_dict(json.loads(cfg.train_config_json))
        self.batch_tokens = train.batch_size * (self.model_config.block_size if self.shard_info.layout == "stream"
                                                else self.shard_info.example_len - 1)
        train.max_iters = max(1, cfg.max_tokens // self.batch_tokens)  # the LR schedule spans the run's budget
        self.tps, train.micro_batch_size = self._benchmark(train)
        self.model = GPT(self.model_config)
        self.trainer = Trainer(self.model, train, self.device)
        log.info("joined %s as %s (%s), run %s", self.client.address, self.worker_id, self.name, cfg.run_id)
        self._reachability_advice()
        self._sync_from_checkpoint()
        self.hb_thread = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self.hb_thread.start()

    def _resume_session(self):
        """After a crash, a reboot or a restart: come back as the same worker (same id, same
        contribution totals) if the coordinator still knows our session. The run config, or None."""
        path = self.state_dir / "session.json"
        try:
            saved = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if saved.get("coordinator") != self.client.address:
            return None
        self.client.session = saved["session"]
        try:
            cfg = self.client.call("GetRunConfig", pb.RunConfigRequest())
        except UserError:  # the coordinator forgot us (new run, revoked sessions): join afresh
            self.client.session = ""
            return None
        if cfg.run_id != saved.get("run_id"):
            self.client.session = ""
            return None
        self.worker_id = saved["worker_id"]
        log.info("resuming as %s (%s) in run %s", self.worker_id, self.name, cfg.run_id)
        return cfg

    def _benchmark(self, train):
        """Tokens/s of a training step on this device, and the micro-batch that fits its memory,
        measured once on a throwaway copy of the model and cached per (model, device, dtype)."""
        dtype = str(resolve_dtype(self.device, train.dtype)).replace("torch.", "")
        key = hashlib.sha256(json.dumps([self.model_config.to_dict(), train.batch_size, describe_device(self.device),
                                         dtype], sort_keys=True).encode()).hexdigest()[:16]
        cache = self.state_dir / "benchmarks.json"
        try:
            known = json.loads(cache.read_text())
        except (FileNotFoundError, ValueError):
            known = {}
        if key in known:
            b = known[key]
            log.info("throughput %s tokens/s on %s (%s, micro-batch %d; measured earlier)",
                     f"{b['tokens_per_second']:,.0f}", describe_device(self.device), dtype, b["micro_batch_size"])
            return b["tokens_per_second"], b["micro_batch_size"]
        trial = Trainer(GPT(self.model_config), TrainConfig(**{**train.to_dict(), "max_iters": 10**9}), self.device)
        T = self.model_config.block_size
        x = torch.randint(0, self.model_config.vocab_size, (train.batch_size, T))
        trial.train_step(x, x)  # warm-up (and the micro-batch search, if memory is short)
        t0, steps = time.perf_counter(), 3
        for _ in range(steps):
            trial.train_step(x, x).item()
        tps = steps * x.numel() / (time.perf_counter() - t0)
        micro = trial.cfg.micro_batch_size or train.batch_size
        del trial
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        known[key] = {"tokens_per_second": round(tps, 1), "micro_batch_size": micro, "device": describe_device(self.device),
                      "dtype": dtype, "measured_at": time.time()}
        cache.write_text(json.dumps(known, indent=1))
        log.info("throughput %s tokens/s on %s (%s, micro-batch %d)", f"{tps:,.0f}", describe_device(self.device),
                 dtype, micro)
        return tps, micro

    def _reachability_advice(self):
        if self.client_mode:
            log.info("client mode: nothing to open in your firewall; your averaging goes through the coordinator")
            return
        addrs = [str(m).split("/p2p/")[0] for m in self.dht.get_visible_maddrs()]
        r = self.client.call("CheckReachability", pb.ReachabilityRequest(peer_id=self.dht.peer_id.to_base58(),
                                                                          addrs=addrs))
        if r.reachable:
            log.info("reachable: the coordinator can connect to %s", ", ".join(addrs))
        else:
            port = addrs[0].rsplit("/", 1)[-1] if addrs else "?"
            log.warning("the coordinator cannot reach %s (%s): open TCP port %s in your firewall and forward it "
                        "on your router (and pass --announce-host YOUR_PUBLIC_IP), or drop --p2p-listen to run in "
                        "client mode", ", ".join(addrs), r.detail, port)

    def _save_session(self, run_id):
        path = self.state_dir / "session.json"
        path.write_text(json.dumps({"coordinator": self.client.address, "run_id": run_id,
                                    "worker_id": self.worker_id, "session": self.client.session}))
        os.chmod(path, 0o600)

    def _teardown(self):
        self.stopping.set()
        self.client.stop.set()
        if self.hb_thread is not None:
            self.hb_thread.join(timeout=3)
        if self.client.stub is not None and self.client.session:
            try:
                self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=self._lease_ids()), timeout=3, retry=False)
                self.client.call("Leave", pb.LeaveRequest(), timeout=3, retry=False)
            except Exception as e:  # the coordinator may be gone; its lease deadlines recover the shards
                log.warning("could not say goodbye to the coordinator: %s", e)
        self._log_utilization()
        self.client.close()
        if self.control is not None:
            self.control.close()
        if self.averager is not None:
            self.averager.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        log.info("left the swarm")

    def _log_utilization(self):
        if self.first_step_at is None or self.last_sync_at is None:
            return
        wall = self.last_sync_at - self.first_step_at
        share = min(self.compute_seconds, wall) / wall if wall > 0 else 0.0
        log.info("computed %.0f%% of the time (%.1f s in training steps of %.1f s from the first step to the last "
                 "round)", 100 * share, self.compute_seconds, wall,
                 extra={"fields": {"event": "utilization", "compute_seconds": round(self.compute_seconds, 2),
                                   "wall_seconds": round(wall, 2), "compute_utilization": round(share, 4)}})

    # --- the loop ---

    def _loop(self):
        while not self.stopping.is_set():
            v = self.view
            if v is None:
                self._sleep(0.1)
                continue
            if v.finished:
                log.info("the run is finished")
                return
            if v.round > self.round:
                self._missed_round(v)
            elif v.phase == "averaging" and self.round_tokens > 0:
                self._sync_round()
            elif self.finish_requested.is_set() and self.round_tokens == 0:
                log.info("finished: the last round's contribution is reported; leaving")
                return
            elif self._pause_reason():
                self._paused(self._pause_reason())
            elif not v.may_train or v.phase != "training":
                self._set_state("waiting", "waiting for the round" + (": averaging in progress"
                                                                        if v.phase == "averaging" else ""))
                self._sleep(self.cfg.heartbeat_interval / 2)
            elif self.shard is None:
                self._lease()
            else:
                self._train_step()

    # --- pausing: by the volunteer, the schedule, other users of the machine, finish, --max-hours ---

    def _pause_reason(self):
        if self.finish_requested.is_set():
            return f"finishing: waiting for round {self.round} to end, then leaving"
        if self.user_paused:
            return "paused by you (`gptswarm worker resume` continues)"
        if self.max_hours and time.time() - self.started_at > self.max_hours * 3600:
            self.finish_requested.set()
            return f"--max-hours {self.max_hours:g} reached: finishing the round"
        now = time.monotonic()
        if now - self._pause_checked > 2.0:  # the schedule and the idle probes are polled, not every step
            self._pause_checked = now
            self._pause = self.schedule.reason() if self.schedule else ""
            if not self._pause and self.idle is not None:
                self._pause = self.idle.check()[1]
        return self._pause

    def _paused(self, reason):
        """Stop training but stay in the swarm: give back the shard in progress (what it trained
        so far still counts in this round's average), keep heartbeating."""
        state = "finishing" if self.finish_requested.is_set() else "paused"
        if self.state != state or self.reason != reason:
            log.info("%s: %s", state, reason)
        self._set_state(state, reason)
        if self.shard is not None:
            self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=[self.shard["lease_id"]]))
            self.shard = None
        self._sleep(min(1.0, self.cfg.heartbeat_interval))

    def _control(self, cmd):
        if cmd in ("pause", "resume"):
            self.user_paused = cmd == "pause"
            flag = self.state_dir / "paused"
            if self.user_paused:
                flag.write_text(json.dumps({"paused_at": time.time()}))
            elif flag.exists():
                flag.unlink()
        elif cmd == "finish":
            self.finish_requested.set()
        return self.status()

    def status(self):
        return {"worker_id": getattr(self, "worker_id", None), "name": self.name, "coordinator": self.client.address,
                "device": describe_device(self.device), "state": self.state, "reason": self.reason,
                "round": self.round, "round_tokens": self.round_tokens, "tokens_contributed": self.tokens_contributed,
                "tokens_per_second": round(self.tps, 1), "paused": self.user_paused,
                "finishing": self.finish_requested.is_set(),
                "schedule": self.schedule.text if self.schedule else None, "idle_only": self.idle is not None}

    def _train_step(self):
        self._set_state("training", "")
        s = self.shard
        if s["lease_id"] in self.lost:
            log.info("lease %s expired at the coordinator; dropping its shard", s["lease_id"])
            self.shard = None
            return
        x, y = s["batches"].next()
        if self.first_step_at is None:
            self.first_step_at = time.time()
            since = self.first_step_at - psutil.Process().create_time()
            log.info("training: first batch %.1f s after the worker started", since,
                     extra={"fields": {"event": "first_step", "seconds_since_start": round(since, 2)}})
        t0 = time.perf_counter()
        try:
            loss = self.trainer.train_step(x, y)
        except torch.OutOfMemoryError:
            raise UserError(f"the model does not fit in {self.device}'s memory even one sequence at a time; "
                            "use a bigger GPU, a larger --max-vram, or --device cpu") from None
        if FAULT == "nan-gradient":
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        s["steps_done"] += 1
        self.round_tokens += x.numel()
        s["loss"] = loss.item()
        self.losses = (self.losses + [s["loss"]])[-50:]
        dt = time.perf_counter() - t0
        self.compute_seconds += dt
        self.tps = 0.9 * self.tps + 0.1 * (x.numel() / dt) if self.tps else x.numel() / dt
        if s["steps_done"] >= s["steps_needed"]:
            self.completed.append((s["lease_id"], s["tokens"], s["loss"]))
            self.shard = None

    def _lease(self):
        self._set_state("waiting", "asking for a shard")
        resp = self.client.call("LeaseShard", pb.LeaseRequest(round=self.round))
        if not resp.granted:
            self._set_state("waiting", resp.reason)
            self._sleep(resp.retry_after or 1.0)
            return
        chunks = self.client.call("GetShard", pb.ShardRequest(shard_index=resp.shard_index), timeout=120, stream=True)
        try:
            tokens = decode_shard(b"".join(c.data for c in chunks), resp.sha256, f"shard {resp.shard_index}")
        except UserError as e:
            log.warning("%s; giving the lease back", e)
            self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=[resp.lease_id]))
            return
        shard = Shard(tokens, "train", resp.sha256)
        batches = Batches([shard], self.shard_info, self.model_config.block_size, self.trainer.cfg.batch_size,
                          seed=int(resp.sha256[:8], 16) ^ resp.epoch)
        self.shard = {"lease_id": resp.lease_id, "tokens": resp.tokens, "batches": batches, "steps_done": 0,
                      "steps_needed": max(1, math.ceil(resp.tokens / batches.tokens_per_batch)), "loss": None}

    def _sync_round(self):
        """The round is averaging: contribute our pseudo-gradient, take the outer step, check."""
        r = self.round
        self._set_state("averaging", f"averaging round {r} with the swarm")
        local = {k: v for k, v in self.model.state_dict().items() if k != checkpoint.TIED}
        grad = pseudo_gradient(self.theta, local)
        if not all(torch.isfinite(g).all() for g in grad.values()):
            log.warning("round %d: our pseudo-gradient is not finite; the swarm will reject it", r)
        outcome = self.averager.average(grad, self.round_tokens, r, self.worker_id, self.cfg.averaging_timeout,
                                        give_up=lambda: self.stopping.is_set() or self.view.round > r)
        if self.stopping.is_set():
            return  # leaving: the teardown gives the leases back
        if outcome.ok:
            outer_step(self.theta, self.momentum, outcome.averaged, self.cfg.outer_lr, self.cfg.outer_momentum)
        else:
            log.warning("round %d: %s", r, outcome.error)
        result = self._round_result(r)
        if result.included:
            for lease_id, tokens, loss in self.completed:
                self.client.call("ReportShard", pb.ReportRequest(lease_id=lease_id, round=r, tokens=tokens,
                                                                 loss=loss or 0.0))
            self.tokens_contributed += self.round_tokens
        else:
            self._give_back(f"round {r} did not include our contribution ({result.detail or result.state})")
        self.completed = []
        self.round, self.round_tokens = r + 1, 0
        self.last_sync_at = time.time()
        if self.finish_requested.is_set():
            return
        if outcome.ok and result.state == "done" and checkpoint.state_hash(self.theta) == result.theta_hash:
            self._load_theta_into_model()
            log.info("round %d done: theta %s... agrees with the coordinator (%d bytes sent)", r,
                     result.theta_hash[:12], outcome.bytes_sent)
            self._beat()  # learn that the next round is open now, not at the next heartbeat
        elif not outcome.ok and result.state == "failed" and checkpoint.state_hash(self.theta) == result.theta_hash:
            self._load_theta_into_model()  # nothing moved anywhere: carry on from the same theta
        else:
            log.warning("round %d: theta differs from the coordinator's; resynchronizing", r)
            self._sync_from_checkpoint()

    def _round_result(self, r):
        while True:
            res = self.client.call("GetRoundResult", pb.RoundResultRequest(round=r))
            if res.state in ("done", "failed") or self.stopping.is_set():
                return res
            self._sleep(0.2)

    def _missed_round(self, v):
        """The coordinator moved on without us (we were waiting, or missed the averaging)."""
        if self.round_tokens > 0 or self.completed:
            self._give_back(f"missed the averaging of round {self.round}")
        self.round_tokens = 0
        self._sync_from_checkpoint()

    def _give_back(self, why):
        ids = self._lease_ids()
        if ids:
            self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=ids))
            log.info("%s: returned %d lease(s)", why, len(ids))
        self.completed, self.shard = [], None

    def _lease_ids(self):
        ids = [c[0] for c in self.completed]
        if self.shard is not None:
            ids.append(self.shard["lease_id"])
        return ids

    # --- theta ---

    def _sync_from_checkpoint(self):
        self._set_state("syncing", "downloading theta_global from the coordinator")
        chunks = self.client.call("GetCheckpoint", pb.CheckpointRequest(), timeout=600, stream=True)
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for c in chunks:
                files.setdefault(c.file, []).append(c.data)
            for name, parts in files.items():
                (Path(tmp) / Path(name).name).write_bytes(b"".join(parts))
            model, _, meta, momentum = load_theta(tmp)
        theta = {k: v.clone() for k, v in model.state_dict().items() if k != checkpoint.TIED}
        if checkpoint.state_hash(theta) != chunks[0].theta_hash:
            raise UserError("downloaded checkpoint does not match the coordinator's theta hash")
        self.theta, self.momentum = theta, momentum
        self.round = chunks[0].round
        self.round_tokens = 0
        self.tokens_trained = int(meta.get("tokens_trained", 0))
        self._load_theta_into_model()
        log.info("synchronized to round %d (theta %s...)", self.round, chunks[0].theta_hash[:12])

    def _load_theta_into_model(self):
        with torch.no_grad():
            params = self.model.state_dict()
            for k, v in self.theta.items():
                params[k].copy_(v)
        tokens = self.view.tokens_trained if self.view is not None else self.tokens_trained
        self.trainer.step = tokens // self.batch_tokens  # the LR schedule follows the swarm's progress

    # --- heartbeats ---

    def _progress(self):
        """The terminal's status line (a JSON record with --json-logs), every 10 s."""
        v = self.view
        eta = ""
        if v is not None and v.swarm_tokens_per_second > 0 and self.state == "training":
            left = max(0, v.tokens_per_round - v.swarm_round_tokens)
            eta = f" · sync in ~{left / v.swarm_tokens_per_second:.0f} s"
        fields = {"round": self.round, "state": self.state, "reason": self.reason,
                  "tokens_per_second": round(self.tps), "round_tokens": self.round_tokens,
                  "tokens_contributed": self.tokens_contributed}
        what = self.state + (f" ({self.reason})" if self.reason else "")
        log.info("round %d · %s · %s tok/s · %s tokens this round · %s contributed%s", self.round, what,
                 f"{self.tps:,.0f}", f"{self.round_tokens:,}", f"{self.tokens_contributed:,}", eta,
                 extra={"fields": fields})

    def _heartbeats(self):
        last_progress = time.monotonic()
        while not self.stopping.wait(self.cfg.heartbeat_interval):
            if time.monotonic() - last_progress >= 10:
                last_progress = time.monotonic()
                self._progress()
            self._beat()

    def _beat(self):
        req = pb.HeartbeatRequest(round=self.round, round_tokens=self.round_tokens, tokens_per_second=self.tps,
                                  state=self.state, reason=self.reason, lease_ids=self._lease_ids(),
                                  bytes_sent=self.averager.bytes_sent_total,
                                  loss=sum(self.losses) / len(self.losses) if self.losses else 0.0)
        try:
            resp = self.client.call("Heartbeat", req, timeout=5, retry=False)
        except Exception as e:
            code = getattr(e, "code", lambda: None)()
            self._on_heartbeat_failed(f"coordinator unreachable ({code.name if code else type(e).__name__}); "
                                      "training on, retrying")
            return
        self.lost.update(resp.expired_lease_ids)
        self.view = resp

    def _on_heartbeat_failed(self, reason):
        self._unreachable(self.state, reason)  # training goes on

    def _on_wait(self, reason):
        self._unreachable("waiting", reason)  # a call is blocked, retrying

    def _unreachable(self, state, reason):
        """Log once per outage, not at every retry."""
        if not self.reason.startswith("coordinator unreachable"):
            log.warning("%s", reason)
        self._set_state(state, reason)

    def _set_state(self, state, reason):
        self.state, self.reason = state, reason

    def _sleep(self, seconds):
        self.stopping.wait(seconds)
