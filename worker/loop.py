"""The worker's round state machine.

hivemind peer (outgoing only) -> join with its peer id -> run config -> theta_global from the
latest checkpoint -> loop:
  lease a shard -> inner AdamW steps with the shared Trainer -> when the coordinator says the round
  is averaging: ask for our place in its group -> pseudo-gradient = theta_global - theta_local ->
  sent to the coordinator's hivemind peer, which returns the weighted average -> outer Nesterov
  step (bit-identical on every peer) -> hash check against the coordinator (resynchronize if
  different) -> report the shards the average included.
A worker that joins while a round is under way waits for the next one.

Overlap: the exchange (contribution, outer step, the coordinator's result) runs on a thread of its
own while the worker trains ahead for the next round, on the shard it holds or a new one (the
coordinator leases to the members of the averaging group). When the result is in, the progress
made meanwhile is kept on top of the new theta_global (theta_local += theta_new - theta_local_sent:
the outer update lands one exchange late, as in Streaming DiLoCo and the eager updates of Kale et
al. 2025) and its tokens are the next round's first; if the round did not include us, it is
dropped with its leases. theta_global itself is never touched by it: it stays bit-identical.

The parts around it: session.py (join or resume), throughput.py (the speed benchmark), pause.py
(when not to train), heartbeat.py (heartbeats and the progress line), download.py (shards and
theta), state.py (what the threads share), utilization.py, control.py (the volunteer's control
socket).
"""

import logging
import platform
import threading
import time

import grpc
import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.model import GPT
from gptswarm.mingpt_core.trainer import Trainer, limit_vram, resolve_device
from gptswarm.private import private_dir
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds.averaging import Outcome, RoundContributor
from gptswarm.rounds.codecs import ErrorFeedback
from gptswarm.rounds.outer import outer_step, pseudo_gradient
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.theta import theta_hash, theta_views
from gptswarm.worker import download, run_config, session, throughput
from gptswarm.worker.client import CoordinatorClient, Stopped
from gptswarm.worker.control import ControlServer
from gptswarm.worker.heartbeat import Heartbeats, unreachable
from gptswarm.worker.idle import CpuProbe, IdleDetector, NvmlProbe
from gptswarm.worker.pause import PausePolicy
from gptswarm.worker.schedule import Schedule
from gptswarm.worker.state import SharedState
from gptswarm.worker.utilization import Utilization

log = logging.getLogger("gptswarm.worker")
RESULT_POLL = 0.05  # seconds between asking whether our round committed (the coordinator's commit takes ~0.1 s)


class Task:
    """fn() on a thread of its own; get() returns its value, or raises its error on the caller's thread."""

    def __init__(self, fn, name):
        self.done = threading.Event()
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as e:  # raised on the loop's thread, by get()
            self.error = e
        finally:
            self.done.set()

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value


class Exchange(Task):
    """Round `round`'s exchange with the swarm: fn returns (Outcome, RoundResult or None if we stop,
    whether our theta_global agrees with the coordinator's). sent: theta_local when the
    pseudo-gradient was taken (None: we are not in the group)."""

    def __init__(self, round_, group, sent, fn):
        self.round, self.group, self.sent = round_, group, sent
        self.ahead_seconds = 0.0  # in training steps for the next round, meanwhile
        super().__init__(fn, "exchange")


class Worker:
    """One volunteer's worker; config: WorkerConfig. run() blocks until the run is finished, the
    volunteer stops it (request_stop, or `finish` on the control socket) or an error occurs.

    Subclasses may override contribution() to change what goes into the average (the tests' hostile
    workers do)."""

    def __init__(self, config):
        self.config = config
        self.device = resolve_device(config.device)
        limit_vram(self.device, config.max_vram)
        self.state_dir = private_dir(config.state_dir)
        idle = None
        if config.idle_only:
            on_gpu = self.device.type == "cuda"
            idle = IdleDetector(gpu_probe=NvmlProbe(self.device.index or 0) if on_gpu else None,
                                cpu_probe=None if on_gpu else CpuProbe())
        self.schedule = Schedule.parse(config.schedule) if config.schedule else None
        self.pause = PausePolicy(self.state_dir, schedule=self.schedule, idle=idle, max_hours=config.max_hours)
        self.name = config.name or platform.node() or "volunteer"
        self.shared = SharedState()
        self.client = CoordinatorClient(config.join, config.token, pin=config.tls_fingerprint,
                                        plaintext=config.plaintext,
                                        on_wait=lambda reason: unreachable(self.shared, "waiting", reason))
        self.stopping = threading.Event()
        self.utilization = Utilization()
        self.worker_id = None
        self.cfg = None  # the coordinator's RunConfig
        self.spec = None  # what it says to train, checked (run_config.RunSpec)
        self.shard_info = None  # the run's ShardSet layout (no shards)
        self.model = self.trainer = None
        self.batch_tokens = 0  # tokens in one training batch
        self.theta = self.momentum = None  # theta_global and the outer momentum, fp32 on the CPU
        self.tokens_trained = 0  # the swarm's, at the last checkpoint we synchronized to
        self.node = self.contributor = self.heartbeats = self.control = None
        self.feedback = None  # a top-k run's error feedback (what we have not sent yet)
        self.exchange = None  # the Exchange of the round whose average is in flight
        self.prefetch = None  # the Task leasing our next shard while the last steps of this one run

    # --- public ---

    def request_stop(self):
        """Stop soon: give the leases back and leave (what Ctrl+C does)."""
        self.stopping.set()
        self.client.stop.set()

    def run(self):
        try:
            self.control = ControlServer(self.state_dir, self.on_control)
            self._bootstrap()
            self._loop()
        except Stopped:
            pass
        finally:
            self._teardown()

    def on_control(self, cmd):
        """A command from `gptswarm worker pause|resume|finish|status` (the control thread)."""
        if cmd in ("pause", "resume"):
            self.pause.pause(cmd == "pause")
        elif cmd == "finish":
            self.pause.finish()
        return self.status()

    def status(self):
        s = self.shared
        with s.lock:
            progress = {"state": s.state, "reason": s.reason, "round": s.round, "round_tokens": s.round_tokens,
                        "tokens_contributed": s.tokens_contributed, "tokens_per_second": round(s.tokens_per_second, 1)}
        return {"worker_id": self.worker_id, "name": self.name, "coordinator": self.client.address,
                "device": throughput.describe_device(self.device), **progress, "paused": self.pause.paused,
                "finishing": self.pause.finishing.is_set(), "schedule": self.schedule.text if self.schedule else None,
                "idle_only": self.pause.idle is not None}

    def contribution(self, grad, weight, round_):
        """What this worker sends to round round_'s average: its pseudo-gradient and the weight the
        coordinator gave it (the coordinator weighs it by its ledger, never by this), as they are."""
        return grad, weight

    # --- setup and teardown ---

    def _bootstrap(self):
        self.node = P2PNode()  # dials out only: nothing to open in a firewall, nobody can dial it
        self.client.connect()
        self.worker_id, cfg = session.join_or_resume(self.client, self.state_dir, name=self.name,
                                                     device=throughput.describe_device(self.device),
                                                     peer_id=str(self.node.peer_id))
        self.cfg, self.spec = cfg, run_config.parse(cfg, self.device)
        model_config, train, self.shard_info = self.spec.model, self.spec.train, self.spec.shard_info
        self.contributor = RoundContributor(self.node, theta_views(GPT(model_config)), prefix=cfg.averaging_prefix,
                                            compression=cfg.compression, topk_fraction=cfg.topk_fraction)
        self.feedback = ErrorFeedback(cfg.topk_fraction) if cfg.compression == "topk" else None
        self.batch_tokens = train.batch_size * (model_config.block_size if self.shard_info.layout == "stream"
                                                else self.shard_info.example_len - 1)
        train.max_iters = max(1, cfg.max_tokens // self.batch_tokens)  # the LR schedule spans the run's budget
        tps, train.micro_batch_size = throughput.measure(model_config, train, self.device, self.state_dir)
        self.shared.tokens_per_second = tps
        self.model = GPT(model_config)
        self.trainer = Trainer(self.model, train, self.device)
        log.info("joined %s as %s (%s), run %s; our hivemind peer %s only dials out (nothing to open in your "
                 "firewall)", self.client.address, self.worker_id, self.name, cfg.run_id, self.node.peer_id)
        self._sync_from_checkpoint()
        self.heartbeats = Heartbeats(self.shared, self.client, interval=cfg.heartbeat_interval,
                                     bytes_sent=lambda: self.contributor.bytes_sent_total).start()

    def _teardown(self):
        self.stopping.set()
        self.client.stop.set()
        if self.heartbeats is not None:
            self.heartbeats.shutdown()
        for task in (self.exchange, self.prefetch):
            if task is not None:
                task.thread.join(timeout=5)  # it gives up when we stop
        if self.client.stub is not None and self.client.session:
            try:
                self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=self.shared.lease_ids()), timeout=3,
                                 retry=False)
                self.client.call("Leave", pb.LeaveRequest(), timeout=3, retry=False)
            except Exception as e:  # the coordinator may be gone; its lease deadlines recover the shards
                log.warning("could not say goodbye to the coordinator: %s", e)
        self.utilization.log()
        self.client.close()
        if self.control is not None:
            self.control.close()
        if self.node is not None:
            self.node.shutdown()
        log.info("left the swarm")

    # --- the loop ---

    def _loop(self):
        s = self.shared
        while not self.stopping.is_set():
            if self.exchange is not None:
                if self.exchange.done.is_set():
                    self._end_round()
                else:
                    self._train_ahead()
                continue
            with s.lock:
                v, round_, round_tokens = s.view, s.round, s.round_tokens
            if v is None:
                self._sleep(0.1)
                continue
            if v.finished:
                log.info("the run is finished")
                return
            if v.round > round_:
                self._missed_round()
            elif v.phase == "averaging" and v.round == round_ and round_tokens > 0:
                self._start_round_end()
            elif self.pause.finishing.is_set() and round_tokens == 0:
                log.info("finished: the last round's contribution is reported; leaving")
                return
            elif reason := self.pause.reason():
                self._paused(reason)
            elif not v.may_train or v.phase != "training":
                s.set("waiting", "waiting for the round" + (": averaging in progress" if v.phase == "averaging"
                                                             else ""))
                self._sleep(self.cfg.heartbeat_interval / 2)
            elif s.shard is None:
                self._lease()
            else:
                self._train_step()

    def _paused(self, reason):
        """Stop training but stay in the swarm: give back the shard in progress (what it trained
        so far still counts in this round's average), keep heartbeating."""
        s = self.shared
        state = "finishing" if self.pause.finishing.is_set() else "paused"
        if s.get() != (state, reason):
            log.info("%s: %s", state, reason)
        s.set(state, reason)
        self._settle_prefetch()
        with s.lock:
            ids = [sh.lease_id for sh in (s.shard, s.next_shard) if sh is not None]
            s.shard = s.next_shard = None
        if ids:
            self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=ids))
        self._sleep(min(1.0, self.cfg.heartbeat_interval))

    def _lease(self, wait=None):
        """Take the shard leased ahead, or lease and download one; on a refusal, wait(seconds)
        (default: sleep) before returning."""
        s = self.shared
        self._settle_prefetch()
        with s.lock:
            shard, s.next_shard = s.next_shard, None
            if shard is not None and shard.lease_id not in s.lost:
                s.shard = shard
                return
        s.set("waiting", "asking for a shard")
        reason, retry_after = self._request_shard()
        if not reason:
            return
        s.set("waiting", reason)
        if wait is None:  # refused: the round may have begun averaging since our last heartbeat
            self.heartbeats.beat()
            with s.lock:
                if s.view is not None and (s.view.phase != "training" or s.view.round != s.round):
                    return  # it did: the loop takes it from here
        (wait or self._sleep)(retry_after)

    def _request_shard(self, ahead=False):
        """Lease a shard and download it into the shared state (as the next one if ahead): ("", 0)
        or (why not, seconds to wait before asking again)."""
        s = self.shared
        req = s.lease_request()
        resp = self.client.call("LeaseShard", req)
        s.announced(req.finished_lease_ids)
        if not resp.granted:
            return resp.reason, resp.retry_after or 1.0
        session = self.client.session
        try:
            shard = download.shard(self.client, resp, self.shard_info, block_size=self.model.config.block_size,
                                   batch_size=self.trainer.cfg.batch_size)
        except (UserError, grpc.RpcError) as e:
            log.warning("shard download failed (%s); giving the lease back", download.why(e))
            self.client.rejoin_if_ended(e, session)  # before giving it back, with a session that still works
            self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=[resp.lease_id]))
            return "shard download failed", 1.0
        with s.lock:
            if ahead:
                s.next_shard = shard
            else:
                s.shard = shard
        return "", 0.0

    def _lease_room(self, held):
        """May we ask for one more lease while holding `held` in training? The shards we finished
        ahead of the next round still count against the coordinator's cap of active leases (we
        cannot say they are finished before that round opens). Under the shared state's lock."""
        return held + len(self.shared.ahead_completed) < (self.cfg.max_leases or 1)

    def _prefetch(self):
        """Lease our next shard on a thread, while we train or load theta (if the coordinator's
        cap lets us hold it beside the shard in training)."""
        s = self.shared
        if self.prefetch is not None or self.pause.reason():
            return
        with s.lock:
            room = s.next_shard is None and self._lease_room(0 if s.shard is None else 1)
        if room:
            self.prefetch = Task(lambda: self._request_shard(ahead=True), "prefetch")

    def _settle_prefetch(self):
        """Wait for a lease asked ahead (so that what we give back includes it)."""
        task, self.prefetch = self.prefetch, None
        if task is not None:
            task.done.wait()
            if isinstance(task.error, Stopped):
                raise task.error
            if task.error is not None:  # we ask again, now
                log.warning("leasing the next shard ahead failed: %s", download.why(task.error))

    def _train_step(self):
        s = self.shared
        s.set("training", "")
        shard = s.shard
        if shard.lease_id in s.lost:
            log.info("lease %s expired at the coordinator; dropping its shard", shard.lease_id)
            with s.lock:
                s.shard = None
            return
        if shard.steps_needed - shard.steps_done <= 1:
            self._prefetch()  # the next shard arrives while the last step of this one runs
        x, y = shard.batches.next()
        t0 = time.perf_counter()
        try:
            loss = self.trainer.train_step(x, y).item()
        except torch.OutOfMemoryError:
            raise UserError(f"the model does not fit in {self.device}'s memory even one sequence at a time; "
                            "use a bigger GPU, a larger --max-vram, or --device cpu") from None
        seconds = time.perf_counter() - t0
        self.utilization.step(seconds)
        if self.exchange is not None:
            self.exchange.ahead_seconds += seconds
        shard.steps_done += 1
        shard.loss = loss
        # a shard earns its own tokens, no more: the last batch may reach past them
        tokens = min(x.numel(), shard.tokens - shard.counted)
        shard.counted += tokens
        s.trained(shard.lease_id, tokens, x.numel(), loss, seconds)
        if shard.steps_done >= shard.steps_needed:
            s.finished_shard(shard.lease_id, shard.tokens, loss)

    # --- the end of a round ---

    def _start_round_end(self):
        """The round is averaging: take our place in its group, then contribute our pseudo-gradient,
        take the outer step and wait for the coordinator's result on the exchange's thread (the
        loop trains ahead meanwhile)."""
        s = self.shared
        r = s.round
        s.set("averaging", f"averaging round {r} with the swarm")
        group = self._averaging_group(r)
        if group is None:
            return  # stopping, or the round moved on without us (the loop resynchronizes)
        if group.state != "member":
            log.warning("round %d: %s", r, group.detail)
            self.exchange = Exchange(r, group, None, lambda: (Outcome(False, error=group.detail),
                                                              *self._settle(r, None)))
            return
        sent = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in theta_views(self.model).items()}
        grad = pseudo_gradient(self.theta, sent)
        if self.feedback is not None:  # top-k: the largest values of it and of what we left out before
            grad = self.feedback.sparsify(grad)
        grad, weight = self.contribution(grad, group.weight, r)
        if not all(torch.isfinite(g).all() for g in grad.values()):
            log.warning("round %d: our pseudo-gradient is not finite; the swarm will reject it", r)
        with s.lock:
            s.ahead = True  # from now on, what we train is the next round's

        def exchange():
            outcome = self.contributor.contribute(
                grad, group_id=group.group_id, reducer=self.cfg.coordinator_peer_id,
                reducer_maddrs=list(group.reducer_maddrs), weight=weight, timeout=self.cfg.averaging_timeout,
                give_up=self.stopping.is_set)  # not when the round moves on: on a slow link our average may
            # still be arriving after the coordinator committed; a reducer that left us out closes our stream
            if self.stopping.is_set():
                return outcome, None, False
            before = None
            if outcome.ok:  # kept until the coordinator says whether the round committed
                before = ({k: v.clone() for k, v in self.theta.items()},
                          {k: v.clone() for k, v in self.momentum.items()})
                outer_step(self.theta, self.momentum, outcome.averaged, self.cfg.outer_lr, self.cfg.outer_momentum)
            return outcome, *self._settle(r, before)

        self.exchange = Exchange(r, group, sent, exchange)

    def _settle(self, r, before):
        """On the exchange's thread, once our part is done: the coordinator's result of round r
        (RoundResult, or None if we stop) and whether our theta_global agrees with it. A round that
        did not commit puts theta_global back (before: theta and momentum before the outer step);
        one that included us gets the shards we finished in it reported."""
        s = self.shared
        result = self._round_result(r)
        if self.stopping.is_set():
            return None, False
        if self.feedback is not None and result.included and result.state == "done":
            self.feedback.commit()
        if before is not None and result.state != "done":  # failed, or its theta was rejected: nothing moved
            self.theta, self.momentum = before
            log.warning("round %d %s: %s", r, result.state, result.detail)
        if result.included:
            with s.lock:
                completed = list(s.completed)
            for lease_id, _, loss in completed:
                self.client.call("ReportShard", pb.ReportRequest(lease_id=lease_id, round=r, loss=loss or 0.0))
            with s.lock:
                s.completed = []
        return result, theta_hash(self.theta) == result.theta_hash

    def _train_ahead(self):
        """While our round's average is in flight: train for the next round, if we are in this
        round's group and not pausing or finishing; else wait for the exchange. Bounded: at most
        half the tokens we brought this round (the next one must leave room for the others), and
        no lease beyond the coordinator's cap (_lease_room)."""
        ex = self.exchange
        s = self.shared
        with s.lock:
            full = s.ahead_tokens >= ex.group.weight / 2 or (s.shard is None and s.next_shard is None
                                                              and not self._lease_room(0))
        if ex.sent is None or full or self.pause.reason():
            s.set("averaging", f"averaging round {ex.round} with the swarm")
            ex.done.wait(0.05)
        elif s.shard is None:
            self._lease(wait=ex.done.wait)
        else:
            self._train_step()

    def _end_round(self):
        """Our round's exchange is over: keep or drop what it brought, and what we trained ahead."""
        s = self.shared
        ex, self.exchange = self.exchange, None
        with s.lock:
            s.ahead = False
        outcome, result, agrees = ex.get()
        if result is None:
            return  # stopping: the teardown gives the leases back
        r = ex.round
        if not outcome.ok:
            log.warning("round %d: %s", r, outcome.error)
        keep = (outcome.ok and result.state == "done" and result.included and agrees
                and not self.pause.finishing.is_set())
        if not result.included:
            self._give_back(f"round {r} did not include our contribution ({result.detail or result.state})")
        elif not keep and ex.ahead_seconds:
            self._give_back(f"the steps trained ahead during round {r}'s averaging are dropped")
        with s.lock:
            ahead = s.ahead_tokens if keep else 0
        s.next_round(r + 1, contributed=ex.group.weight if result.included else 0, keep_ahead=keep)
        self.utilization.synced(ahead_seconds=ex.ahead_seconds if keep else 0.0)
        if self.pause.finishing.is_set():
            return
        if keep and s.shard is None:
            self._prefetch()  # while we load theta
        if outcome.ok and result.state == "done" and agrees:
            self._load_theta_into_model(carry_from=ex.sent if keep and ex.ahead_seconds else None)
            log.info("round %d done: theta %s... agrees with the coordinator (%d bytes sent; %d tokens trained "
                     "meanwhile carry over)", r, result.theta_hash[:12], outcome.bytes_sent, ahead)
            self.heartbeats.beat()  # learn that the next round is open now, not at the next heartbeat
        elif result.state != "done" and agrees:
            self._load_theta_into_model()  # nothing moved anywhere: carry on from the same theta
        else:
            log.warning("round %d: theta differs from the coordinator's; resynchronizing", r)
            self._sync_from_checkpoint()

    def _averaging_group(self, r):
        """Our place in round r's averaging group, as the coordinator decided it; None if we stop or
        the round is over."""
        while not self.stopping.is_set():
            req = pb.AveragingGroupRequest(round=r)
            req.lease_tokens.extend(self.shared.lease_tokens())  # our final claims: our weight
            group = self.client.call("GetAveragingGroup", req)
            if group.state == "over":
                return None
            if group.state == "member" and group.reducer_peer_id != self.cfg.coordinator_peer_id:
                group.state, group.detail = "not_member", ("the coordinator named another reducer than the hivemind "
                                                           "peer it gave us at join; not sending")
            if group.state != "wait":
                return group
            self._sleep(group.retry_after or 0.2)
        return None

    def _round_result(self, r):
        while True:
            res = self.client.call("GetRoundResult", pb.RoundResultRequest(round=r))
            if res.state in ("done", "failed", "rejected") or self.stopping.is_set():
                return res
            self._sleep(RESULT_POLL)

    def _missed_round(self):
        """The coordinator moved on without us (we were waiting, or missed the averaging)."""
        s = self.shared
        with s.lock:
            trained = s.round_tokens > 0 or s.completed
            r = s.round
        if trained:
            self._give_back(f"missed the averaging of round {r}")
        self._sync_from_checkpoint()

    def _give_back(self, why):
        self._settle_prefetch()
        ids = self.shared.lease_ids()
        if ids:
            self.client.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=ids))
            log.info("%s: returned %d lease(s)", why, len(ids))
        with self.shared.lock:
            self.shared.completed, self.shared.shard, self.shared.next_shard = [], None, None

    # --- theta ---

    def _sync_from_checkpoint(self, tries=8):
        self.shared.set("syncing", "downloading theta_global from the coordinator")
        attempt = 0
        while True:
            session = self.client.session
            try:
                self.theta, self.momentum, round_, meta, digest = download.theta(self.client, self.spec)
                break
            except (UserError, grpc.RpcError) as e:  # a round committed mid-download, the coordinator busy
                attempt += 1
                if attempt == tries:
                    raise UserError(f"cannot download theta_global: {download.why(e)}") from None
                if self.client.rejoin_if_ended(e, session):  # a new session, not another try of the old one
                    log.warning("%s; joined again, downloading again", download.why(e))
                    continue
                log.warning("%s; downloading again", download.why(e))
                self._sleep(min(2 ** (attempt - 1), 30))
        self.tokens_trained = int(meta.get("tokens_trained", 0))
        self.shared.next_round(round_, keep_ahead=False)
        self._load_theta_into_model()
        log.info("synchronized to round %d (theta %s...)", round_, digest[:12])

    def _load_theta_into_model(self, carry_from=None):
        """theta_local = theta_global; or, with carry_from (theta_local when we sent our pseudo-
        gradient), theta_local += theta_global - carry_from: the steps trained since are kept."""
        with torch.no_grad():
            params = self.model.state_dict()
            for k, v in self.theta.items():
                if carry_from is None:
                    params[k].copy_(v)
                else:
                    params[k].add_((v - carry_from[k]).to(params[k].device, params[k].dtype))
        view = self.shared.view
        tokens = view.tokens_trained if view is not None else self.tokens_trained
        self.trainer.step = tokens // self.batch_tokens  # the LR schedule follows the swarm's progress

    def _sleep(self, seconds):
        self.stopping.wait(seconds)
