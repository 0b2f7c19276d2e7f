"""The worker's round state machine.

hivemind peer (outgoing only) -> join with its peer id -> run config -> theta_global from the
latest checkpoint (sync.py) -> loop:
  lease a shard (leases.py) -> inner AdamW steps with the shared Trainer -> when the coordinator
  says the round is averaging, its exchange (exchange.py): ask for our place in its group ->
  pseudo-gradient = theta_global - theta_local -> sent to the coordinator's hivemind peer, which
  returns the weighted average -> outer Nesterov step (bit-identical on every peer) -> hash check
  against the coordinator (resynchronize if different) -> report the shards the average included.
A worker that joins while a round is under way waits for the next one.

Overlap: the exchange (contribution, outer step, the coordinator's result) runs on a thread of its
own while the worker trains ahead for the next round, on the shard it holds or a new one (the
coordinator leases to the members of the averaging group). When the result is in, the progress
made meanwhile is kept on top of the new theta_global (theta_local += theta_new - theta_local_sent:
the outer update lands one exchange late, as in Streaming DiLoCo and the eager updates of Kale et
al. 2025) and its tokens are the next round's first; if the round did not include us, it is
dropped with its leases. theta_global itself is never touched by it: it stays bit-identical.

The parts around it: bootstrap.py (what joining makes), session.py (join or resume), throughput.py (the speed benchmark), pause.py
(when not to train), heartbeat.py (heartbeats and the progress line), download.py (shards and
theta), state.py (what the threads share), utilization.py, control.py (the volunteer's control
socket), client.py (the coordinator's RPCs).
"""

import logging
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.trainer import limit_vram, resolve_device
from gptswarm.private import private_dir
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.theta import theta_views
from gptswarm.states import Phase, WorkerState
from gptswarm.worker import bootstrap, sync, throughput
from gptswarm.worker.bootstrap import Setup
from gptswarm.worker.client import CoordinatorClient, Stopped
from gptswarm.worker.config import WorkerConfig
from gptswarm.worker.control import ControlServer
from gptswarm.worker.exchange import Exchange, Grads
from gptswarm.worker.heartbeat import unreachable
from gptswarm.worker.idle import idle_detector
from gptswarm.worker.pause import PausePolicy
from gptswarm.worker.schedule import Schedule
from gptswarm.worker.state import SharedState
from gptswarm.worker.utilization import Utilization

log = logging.getLogger("gptswarm.worker")


class Worker:
    """One volunteer's worker. run() blocks until the run is finished, the volunteer stops it
    (request_stop, or `finish` on the control socket) or an error occurs.

    Threads: run() is the round loop; it alone touches setup's model and trainer, `outer` (theta_global,
    handed to the exchange's thread while it runs and given back by its Task), `exchange` and
    tokens_trained. The heartbeat and control threads see the worker only through `shared` (its
    lock), `pause` and `client` (each under its own) and what never changes (name, device, schedule);
    the exchange and prefetch Tasks get what they need when they start and give back their result
    through Task.get().

    Subclasses may override contribution() to change what goes into the average (the tests' hostile
    workers do). A harness may replace what touches the hardware (bench/scale.py's simulated
    workers): step(x, y) -> loss tensor instead of the trainer's step, speed (bootstrap.Speed)
    instead of the speed benchmark, and on_rpc(method, seconds) hears every RPC's time."""

    def __init__(self, config: WorkerConfig, *, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 speed: bootstrap.Speed | None = None, on_rpc: Callable[[str, float], None] | None = None) -> None:
        self.config = config
        self.step, self.speed = step, speed
        self.device = resolve_device(config.device)
        limit_vram(self.device, config.max_vram)
        self.state_dir = private_dir(config.state_dir)
        idle = idle_detector(self.device) if config.idle_only else None
        self.schedule = Schedule.parse(config.schedule) if config.schedule else None
        self.pause = PausePolicy(self.state_dir, schedule=self.schedule, idle=idle, max_hours=config.max_hours)
        self.name = config.name or platform.node() or "volunteer"
        self.shared = SharedState()
        self.client = CoordinatorClient(config.join, config.token, pin=config.tls_fingerprint,
                                        plaintext=config.plaintext,
                                        on_wait=lambda reason: unreachable(self.shared, WorkerState.WAITING, reason),
                                        on_rpc=on_rpc)
        self.stopping = threading.Event()
        self.utilization = Utilization()
        self.node: P2PNode | None = None  # our hivemind peer (the first thing _bootstrap makes)
        self.control: ControlServer | None = None
        self._setup: Setup | None = None
        self.outer: sync.OuterState | None = None  # None while an exchange owns it
        self.tokens_trained = 0  # the swarm's, at the last checkpoint we synchronized to
        self.exchange: Exchange | None = None  # the exchange of the round whose average is in flight

    # --- public ---

    def request_stop(self) -> None:
        """Stop soon: give the leases back and leave (what Ctrl+C does)."""
        self.stopping.set()
        self.client.stop.set()

    def run(self) -> None:
        try:
            self.control = ControlServer(self.state_dir, self.on_control)
            self._bootstrap()
            self._loop()
        except Stopped:
            pass
        finally:
            self._teardown()

    def on_control(self, cmd: str) -> dict[str, Any]:
        """A command from `gptswarm worker pause|resume|finish|status` (the control thread)."""
        if cmd in ("pause", "resume"):
            self.pause.pause(cmd == "pause")
        elif cmd == "finish":
            self.pause.finish()
        return self.status()

    def status(self) -> dict[str, Any]:
        s = self.shared
        with s.lock:
            progress = {"state": s.state, "reason": s.reason, "round": s.round, "round_tokens": s.round_tokens,
                        "tokens_contributed": s.tokens_contributed, "tokens_per_second": round(s.tokens_per_second, 1)}
        return {"worker_id": self.client.worker_id or None, "name": self.name, "coordinator": self.client.address,
                "device": throughput.describe_device(self.device), **progress, "paused": self.pause.paused,
                "finishing": self.pause.finishing.is_set(), "schedule": self.schedule.text if self.schedule else None,
                "idle_only": self.pause.idle is not None}

    def contribution(self, grad: Grads, weight: int, round_: int) -> tuple[Grads, float]:
        """What this worker sends to round round_'s average: its pseudo-gradient and the weight the
        coordinator gave it (the coordinator weighs it by its ledger, never by this), as they are."""
        return grad, weight

    @property
    def setup(self) -> Setup:
        if self._setup is None:
            raise RuntimeError("the worker has not joined a run yet")
        return self._setup

    # --- setup and teardown ---

    def _bootstrap(self) -> None:
        self.node = P2PNode()  # dials out only: nothing to open in a firewall, nobody can dial it
        self.client.connect()
        self._setup = bootstrap.join(self.client, self.node, self.shared, pause=self.pause, stopping=self.stopping,
                                     state_dir=self.state_dir, device=self.device, name=self.name, sleep=self._sleep,
                                     speed=self.speed, max_vram=self.config.max_vram)
        self._sync_from_checkpoint()
        self._setup.heartbeats.start()

    def _teardown(self) -> None:
        self.stopping.set()
        self.client.stop.set()
        su = self._setup
        if su is not None:
            su.heartbeats.shutdown()
        for task in (self.exchange, su.leases.prefetch_task if su is not None else None):
            if task is not None:
                task.thread.join(timeout=5)  # it gives up when we stop
        if self.client.stub is not None and self.client.session:
            try:
                self.client.release(self.shared.lease_ids(), timeout=3, retry=False)
                self.client.leave(timeout=3, retry=False)
            except Exception as e:  # noqa: BLE001 (the coordinator may be gone; its lease deadlines recover the shards)
                log.warning("could not say goodbye to the coordinator: %s", e)
        self.utilization.log()
        self.client.close()
        if self.control is not None:
            self.control.close()
        if self.node is not None:
            self.node.shutdown()
        log.info("left the swarm")

    # --- the loop ---

    def _loop(self) -> None:
        s, leases = self.shared, self.setup.leases
        while not self.stopping.is_set():
            if self.exchange is not None:
                if self.exchange.done.is_set():
                    self._end_round(self.exchange)
                else:
                    self._train_ahead(self.exchange)
                continue
            with s.lock:
                v, round_, round_tokens, idle = s.view, s.round, s.round_tokens, s.shard is None
            if v is None:
                self._sleep(0.1)
                continue
            if v.finished:
                log.info("the run is finished")
                return
            if v.round > round_:
                self._missed_round()
            elif v.phase == Phase.AVERAGING and v.round == round_ and round_tokens > 0:
                self._start_round_end(round_)
            elif self.pause.finishing.is_set() and round_tokens == 0:
                log.info("finished: the last round's contribution is reported; leaving")
                return
            elif reason := self.pause.reason():
                self._paused(reason)
            elif not v.may_train or v.phase != Phase.TRAINING:
                s.set(WorkerState.WAITING, "waiting for the round" + (": averaging in progress"
                                                                      if v.phase == Phase.AVERAGING else ""))
                self._sleep(self.setup.cfg.heartbeat_interval / 2)
            elif idle:
                leases.take()
            else:
                self._train_step()

    def _paused(self, reason: str) -> None:
        """Stop training but stay in the swarm: give back the shard in progress (what it trained
        so far still counts in this round's average), keep heartbeating."""
        s = self.shared
        state = WorkerState.FINISHING if self.pause.finishing.is_set() else WorkerState.PAUSED
        if s.get() != (state, reason):
            log.info("%s: %s", state, reason)
        s.set(state, reason)
        self.setup.leases.put_down()
        self._sleep(min(1.0, self.setup.cfg.heartbeat_interval))

    def _train_step(self) -> None:
        s, su = self.shared, self.setup
        with s.lock:
            s.state, s.reason = WorkerState.TRAINING, ""
            shard = s.shard
            if shard is None:
                return
            lost = shard.lease_id in s.lost
            if lost:
                s.shard = None
            steps_left = shard.steps_needed - shard.steps_done
        if lost:
            log.info("lease %s expired at the coordinator; dropping its shard", shard.lease_id)
            return
        if steps_left <= 1:
            su.leases.prefetch()  # the next shard arrives while the last step of this one runs
        if self.step is None:  # our record of the round (rounds/replay.py): this step's lease
            su.recorder.step(shard.lease_id, shard.batches)
        x, y = shard.batches.next()
        t0 = time.perf_counter()
        try:
            loss = (self.step or su.trainer.train_step)(x, y).item()
        except torch.OutOfMemoryError:
            raise UserError(f"the model does not fit in {self.device}'s memory even one sequence at a time; "
                            "use a bigger GPU, a larger --max-vram, or --device cpu") from None
        seconds = time.perf_counter() - t0
        self.utilization.step(seconds)
        if self.exchange is not None:
            self.exchange.ahead_seconds += seconds
        s.stepped(shard, x.numel(), loss, seconds)

    # --- the end of a round (exchange.py) ---

    def _start_round_end(self, r: int) -> None:
        """Round r is averaging: its exchange starts with theta_global handed to it (the loop trains
        ahead meanwhile)."""
        assert self.outer is not None
        su = self.setup
        seal = None if self.step is not None else lambda residual: su.recorder.seal(r, su.trainer, residual)
        ex = su.exchanger.begin(r, self.outer, local=theta_views(su.model), contribution=self.contribution, seal=seal)
        if ex is not None:  # else: stopping, or the round moved on without us (the loop resynchronizes)
            self.exchange, self.outer = ex, None
            if ex.sent is not None and self.step is None:  # the steps trained ahead start from what we sent
                su.recorder.start(su.trainer, base=ex.sent)

    def _train_ahead(self, ex: Exchange) -> None:
        """While our round's average is in flight: train for the next round, if we are in this
        round's group and not pausing or finishing; else wait for the exchange. Bounded: at most
        half the tokens we brought this round (the next one must leave room for the others), and
        no lease beyond the coordinator's cap (Leases.room_locked)."""
        s, leases = self.shared, self.setup.leases
        with s.lock:
            full = s.ahead_tokens >= ex.group.weight / 2 or (s.shard is None and s.next_shard is None
                                                              and not leases.room_locked(0))
            idle = s.shard is None
        if ex.sent is None or full or self.pause.reason():
            s.set(WorkerState.AVERAGING, f"averaging round {ex.round} with the swarm")
            ex.done.wait(0.05)
        elif idle:
            leases.take(wait=ex.done.wait)
        else:
            self._train_step()

    def _end_round(self, ex: Exchange) -> None:
        """Our round's exchange is over: take theta_global back, and keep or drop what the round
        brought and what we trained ahead."""
        s, su = self.shared, self.setup
        self.exchange = None
        with s.lock:
            s.ahead = False
        settled, end = su.exchanger.end(ex, finishing=self.pause.finishing.is_set())
        self.outer, outcome, result, r = settled.outer, settled.outcome, settled.result, ex.round
        if end is None or result is None:
            return  # stopping: the teardown gives the leases back
        if end.give_back:
            su.leases.give_back(end.give_back)
        with s.lock:
            ahead = s.ahead_tokens if end.keep else 0
        s.next_round(r + 1, contributed=ex.group.weight if result.included else 0, keep_ahead=end.keep)
        self.utilization.synced(ahead_seconds=ex.ahead_seconds if end.keep else 0.0)
        if self.pause.finishing.is_set():
            return
        with s.lock:
            idle = s.shard is None
        if end.keep and idle:
            su.leases.prefetch()  # while we load theta
        if end.committed:
            self._load_theta(carry_from=ex.sent if end.keep and ex.ahead_seconds else None)
            log.info("round %d done: theta %s... agrees with the coordinator (%d bytes sent; %d tokens trained "
                     "meanwhile carry over)", r, result.theta_hash[:12], outcome.bytes_sent, ahead)
            su.heartbeats.beat()  # learn that the next round is open now, not at the next heartbeat
        elif not end.resync:
            self._load_theta()  # nothing moved anywhere: carry on from the same theta
        else:
            log.warning("round %d: theta differs from the coordinator's; resynchronizing", r)
            self._sync_from_checkpoint()

    def _missed_round(self) -> None:
        """The coordinator moved on without us (we were waiting, or missed the averaging)."""
        s = self.shared
        with s.lock:
            trained = s.round_tokens > 0 or s.completed
            r = s.round
        if trained:
            self.setup.leases.give_back(f"missed the averaging of round {r}")
        self._sync_from_checkpoint()

    # --- theta (sync.py) ---

    def _sync_from_checkpoint(self) -> None:
        self.shared.set(WorkerState.SYNCING, "downloading theta_global from the coordinator")
        ckpt = sync.from_checkpoint(self.client, self.setup.spec, sleep=self._sleep)
        if self.device.type == "cuda":  # theta_global stays on the host, page-locked: it goes to the GPU each round
            ckpt.outer.theta = {k: v.pin_memory() for k, v in ckpt.outer.theta.items()}
        self.outer, self.tokens_trained = ckpt.outer, ckpt.tokens_trained
        self.shared.next_round(ckpt.round, keep_ahead=False)
        self._load_theta()
        log.info("synchronized to round %d (theta %s...)", ckpt.round, ckpt.digest[:12])

    def _load_theta(self, carry_from: Grads | None = None) -> None:
        """theta_global into the model (sync.into_model), and the LR schedule to the swarm's progress."""
        su = self.setup
        assert self.outer is not None
        sync.into_model(su.model, self.outer.theta, carry_from)
        with self.shared.lock:
            view = self.shared.view
        tokens = view.tokens_trained if view is not None else self.tokens_trained
        su.trainer.step = tokens // su.batch_tokens
        if self.step is None:  # our record of the next round: from here, or theta_global under the steps ahead
            if carry_from is None:
                su.recorder.start(su.trainer)
            else:
                su.recorder.rebase(su.trainer.step)

    def _sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)
