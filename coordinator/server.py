"""The Coordinator: one object that owns the ledger, the hivemind peer (DHT bootstrap + averaging
aggregator), the gRPC server and the round loop. start() / shutdown()."""

import logging
import threading
import time
from pathlib import Path

import torch

from gptswarm.coordinator import run as runs
from gptswarm.coordinator.http import StatusServer
from gptswarm.coordinator.ledger import Ledger
from gptswarm.coordinator.service import make_server
from gptswarm.mingpt_core.data import eval_batches
from gptswarm.mingpt_core.trainer import evaluate_loss
from gptswarm.rounds.averaging import SwarmAverager, start_dht
from gptswarm.rounds.outer import outer_step
from gptswarm.rounds.theta import load_theta, save_theta, theta_hash, theta_views

log = logging.getLogger("gptswarm.coordinator")


class Coordinator:
    """state_dir: a run made by run.new_run; config: CoordinatorConfig; token: a new swarm token
    (rotates the saved one), or None to keep the saved one."""

    def __init__(self, state_dir, config, *, token=None):
        self.state_dir = Path(state_dir)
        self.config = config
        self.settings = runs.load_run(self.state_dir)
        self.token = runs.swarm_token(self.state_dir, token)
        self.shard_set = runs.read_shards(self.state_dir)
        self.train_shards = self.shard_set.split("train")
        self.val_shards = self.shard_set.split("val")
        self.model, self.tokenizer, meta, self.momentum = load_theta(self.state_dir / "checkpoints" / "latest")
        self.theta = theta_views(self.model)  # theta_global, sharing storage with self.model
        self.n_params = self.model.num_params(non_embedding=False)
        self.averaging_prefix = f"gptswarm-{self.settings.run_id}"
        # round state, under self.lock: the round loop writes it, gRPC and HTTP threads read it
        self.lock = threading.RLock()
        self.round = int(meta.get("round", 0))
        self.tokens_trained = int(meta.get("tokens_trained", 0))
        self.theta_hash = theta_hash(self.theta)
        self.phase = "training"
        self.finished = self.tokens_trained >= self.settings.max_tokens
        self.val_loss = meta.get("val_loss")
        self.round_started_at = time.time()
        self._stop = threading.Event()
        self.ledger = self.dht = self.averager = self.server = self.http = self.thread = None
        self.initial_peers, self.port = [], None

    # --- lifecycle ---

    def start(self):
        cfg = self.config
        self.ledger = Ledger(self.state_dir / "ledger.sqlite", lease_seconds=cfg.lease_seconds,
                             heartbeat_interval=cfg.heartbeat_interval)
        self.ledger.add_shards([(s.sha256, len(s)) for s in self.train_shards])
        self.ledger.recover(self.round, self.theta_hash)
        self.round_started_at = time.time()

        # hivemind first, then gRPC (gRPC objects created before hivemind forks print warnings)
        self.dht = start_dht(cfg.dht_listen, announce_host=cfg.announce_host,
                             identity_path=self.state_dir / "p2p_identity.key")
        self.initial_peers = [str(m) for m in self.dht.get_visible_maddrs()]
        self.averager = SwarmAverager(self.dht, self.theta, prefix=self.averaging_prefix,
                                      compression=self.settings.compression, client_mode=False,
                                      matchmaking_time=cfg.matchmaking_time)
        self.server, self.port = make_server(self, cfg.listen)
        if cfg.http_listen:
            self.http = StatusServer(self, cfg.http_listen).start()
        self.thread = threading.Thread(target=self._round_loop, name="rounds", daemon=True)
        self.thread.start()
        log.info("coordinator of run %s: gRPC on port %d, hivemind peer %s, round %d", self.settings.run_id,
                 self.port, self.initial_peers[0] if self.initial_peers else "?", self.round)
        return self

    def shutdown(self):
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=self.config.averaging_timeout + 10)
        if self.http is not None:
            self.http.shutdown()
        if self.server is not None:
            self.server.stop(grace=2).wait()
        if self.averager is not None:
            self.averager.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        if self.ledger is not None:
            self.ledger.close()

    # --- what the service asks ---

    def _round_started(self):
        """Tokens were already trained in the current round (a worker arriving now waits for the next)."""
        return self.phase == "averaging" or self.ledger.round_tokens(self.round) > 0

    def add_worker(self, name, device, peer_id, client_mode):
        with self.lock:
            return self.ledger.add_worker(name=name, device=device, peer_id=peer_id, client_mode=client_mode,
                                          current_round=self.round, round_started=self._round_started())

    def come_back(self, worker):
        with self.lock:
            self.ledger.come_back(worker["id"], current_round=self.round, round_started=self._round_started())
        return self.ledger.worker(worker["id"])

    def may_train(self, worker, round_):
        with self.lock:
            if self.finished:
                return False, "the run is finished"
            if worker["eligible_round"] > self.round:
                return False, "waiting for the round: joined while this round was under way"
            if self.phase != "training":
                return False, "waiting for the round: averaging in progress"
            if round_ != self.round:
                return False, f"round {round_} is over; the current round is {self.round}"
            return True, ""

    def round_view(self):
        with self.lock:
            return {"round": self.round, "phase": self.phase, "theta_hash": self.theta_hash,
                    "tokens_trained": self.tokens_trained, "finished": self.finished}

    def round_result(self, round_, worker_id):
        with self.lock:
            if round_ >= self.round:
                return {"state": self.phase if round_ == self.round else "training", "included": False,
                        "theta_hash": "", "detail": "round in progress"}
        rows = self.ledger.round_rows(round_, round_ + 1)
        if round_ not in rows or round_ + 1 not in rows:
            return {"state": "failed", "included": False, "theta_hash": self.theta_hash,
                    "detail": "unknown round: resynchronize from the latest checkpoint"}
        return {"state": rows[round_]["state"], "included": self.ledger.included(round_, worker_id),
                "theta_hash": rows[round_ + 1]["theta_hash"] or "", "detail": rows[round_]["detail"] or ""}

    def open_checkpoint(self):
        """Open the latest checkpoint's files (safe against the round loop replacing them)."""
        with self.lock:
            d = self.state_dir / "checkpoints" / "latest"
            files = [(p.name, open(p, "rb")) for p in sorted(d.iterdir())]
            return files, self.round, self.theta_hash

    # --- rounds ---

    def _round_loop(self):
        while not self._stop.wait(min(0.5, self.config.heartbeat_interval / 2)):
            try:
                self.ledger.expire()
                if self.finished:
                    continue
                tokens = self.ledger.round_tokens(self.round)
                late = time.time() - self.round_started_at > self.config.round_timeout
                if tokens >= self.settings.tokens_per_round or (tokens > 0 and (late or self._epoch_drained())):
                    self._finish_round()
            except Exception:  # the coordinator must outlive any one bad round
                log.exception("round %d failed", self.round)
                with self.lock:
                    self.phase = "training"

    def _epoch_drained(self):
        """No shard left to lease and nobody training: the epoch's last shards wait for this round's
        average before they can be reported, so the round must end now."""
        return not self.ledger.shard_counts()["pending"] and not self.ledger.anyone_training()

    def _finish_round(self):
        r = self.round
        with self.lock:
            self.phase = "averaging"
        self.ledger.set_round_state(r, "averaging")
        log.info("round %d: %d tokens trained, averaging", r, self.ledger.round_tokens(r))
        t0 = time.time()
        zeros = {k: torch.zeros_like(v) for k, v in self.theta.items()}  # the coordinator adds no gradient
        # close the group once every worker that can bring tokens is in, instead of waiting out the
        # whole matchmaking window: only a worker that held a lease during this round can
        expected = self.ledger.lease_holders_since(self.round_started_at)
        outcome = self.averager.average(zeros, weight=0.0, round_=r, worker_id="coordinator",
                                        timeout=self.config.averaging_timeout, group_size=expected + 1)
        seconds = time.time() - t0
        members = {m["worker_id"]: m for m in outcome.members if m.get("worker_id") != "coordinator"}
        included = {w: (int(m["tokens"]), "") for w, m in members.items() if w not in outcome.rejected}
        excluded = {w: (int(members.get(w, {}).get("tokens", 0)), reason) for w, reason in outcome.rejected.items()}
        if outcome.ok and included:
            outer_step(self.theta, self.momentum, outcome.averaged, self.settings.outer_lr, self.settings.outer_momentum)
            tokens = sum(t for t, _ in included.values())
            self.tokens_trained += tokens
            self.val_loss = self.evaluate()
            losses = [w["loss"] for w in map(self.ledger.worker, included) if w and w["loss"] is not None]
            loss = sum(losses) / len(losses) if losses else None
            save_theta(self.state_dir, self.model, self.tokenizer, self.settings, round_=r + 1,
                       tokens_trained=self.tokens_trained, momentum=self.momentum,
                       extra_meta={"val_loss": self.val_loss, "train_loss": loss})
            self.ledger.finish_round(r, state="done", included=included, excluded=excluded, averaging_seconds=seconds,
                                     loss=loss, val_loss=self.val_loss, bytes_sent=outcome.bytes_sent)
            log.info("round %d done: %d worker(s), %d tokens, val loss %.4f, averaging %.1f s", r, len(included),
                     tokens, self.val_loss, seconds)
        else:
            detail = outcome.error or "no worker joined the averaging group"
            self.ledger.finish_round(r, state="failed", included={}, excluded=excluded, averaging_seconds=seconds,
                                     detail=detail)
            log.warning("round %d failed: %s", r, detail)
        new_hash = theta_hash(self.theta)
        self.ledger.start_round(r + 1, new_hash)
        with self.lock:
            self.round, self.theta_hash, self.phase = r + 1, new_hash, "training"
            self.round_started_at = time.time()
            self.finished = self.tokens_trained >= self.settings.max_tokens
        if self.finished:
            self.ledger.event("finished", f"run reached its budget of {self.settings.max_tokens} tokens")

    def evaluate(self):
        batches = eval_batches(self.val_shards, self.shard_set, self.model.config.block_size, 64,
                               self.config.eval_tokens)
        return round(evaluate_loss(self.model, batches), 4)
