"""The worker's leases: ask the coordinator for a shard and download it (now, or on the prefetch
thread while the last steps of the shard in training run), within the coordinator's cap on the
leases a worker holds; give leases back when we pause, when a round did not include us, or when we
leave."""

import logging
from collections.abc import Callable

import grpc

from gptswarm.errors import UserError
from gptswarm.mingpt_core.data import ShardSet
from gptswarm.states import Phase, WorkerState
from gptswarm.worker import download
from gptswarm.worker.client import CoordinatorClient, Stopped
from gptswarm.worker.exchange import Task
from gptswarm.worker.pause import PausePolicy
from gptswarm.worker.state import SharedState

log = logging.getLogger("gptswarm.worker")


class Leases:
    """shard_info: the run's shard layout; block_size, batch_size: the model's and the trainer's;
    max_leases: the coordinator's cap (0: one); beat(): a heartbeat now; sleep(seconds): wait,
    returning early when the worker stops.

    Runs on the round loop, except request(ahead=True), which runs on the prefetch Task's thread
    and touches only the client, the shared state (under its lock: it puts the shard it leased in
    next_shard) and the values above, fixed at construction. `prefetch` is the round loop's alone."""

    def __init__(self, *, client: CoordinatorClient, shared: SharedState, pause: PausePolicy, shard_info: ShardSet,
                 block_size: int, batch_size: int, max_leases: int, beat: Callable[[], None],
                 sleep: Callable[[float], object]) -> None:
        self.client, self.shared, self.pause, self.shard_info = client, shared, pause, shard_info
        self.block_size, self.batch_size, self.max_leases = block_size, batch_size, max_leases
        self.beat, self.sleep = beat, sleep
        self.prefetch_task: Task[tuple[str, float]] | None = None  # leasing our next shard, meanwhile

    def take(self, wait: Callable[[float], object] | None = None) -> None:
        """Take the shard leased ahead, or lease and download one; on a refusal, wait(seconds)
        (default: sleep) before returning."""
        s = self.shared
        self.settle_prefetch()
        with s.lock:
            shard, s.next_shard = s.next_shard, None
            if shard is not None and shard.lease_id not in s.lost:
                s.shard = shard
                return
        s.set(WorkerState.WAITING, "asking for a shard")
        reason, retry_after = self.request()
        if not reason:
            return
        s.set(WorkerState.WAITING, reason)
        if wait is None:  # refused: the round may have begun averaging since our last heartbeat
            self.beat()
            with s.lock:
                if s.view is not None and (s.view.phase != Phase.TRAINING or s.view.round != s.round):
                    return  # it did: the loop takes it from here
        (wait or self.sleep)(retry_after)

    def request(self, ahead: bool = False) -> tuple[str, float]:
        """Lease a shard and download it into the shared state (as the next one if ahead): ("", 0)
        or (why not, seconds to wait before asking again)."""
        s = self.shared
        claims = s.lease_claims()
        resp = self.client.lease(round_=claims.round, finished_lease_ids=claims.finished_lease_ids,
                                 claims=claims.tokens)
        s.announced(claims.finished_lease_ids)
        if not resp.granted:
            return resp.reason, resp.retry_after or 1.0
        session = self.client.session
        try:
            shard = download.shard(self.client, resp, self.shard_info, block_size=self.block_size,
                                   batch_size=self.batch_size)
        except (UserError, grpc.RpcError) as e:
            log.warning("shard download failed (%s); giving the lease back", download.why(e))
            self.client.rejoin_if_ended(e, session)  # before giving it back, with a session that still works
            self.client.release([resp.lease_id])
            return "shard download failed", 1.0
        with s.lock:
            if ahead:
                s.next_shard = shard
            else:
                s.shard = shard
        return "", 0.0

    def room_locked(self, held: int) -> bool:
        """May we ask for one more lease while holding `held` in training? The shards we finished
        ahead of the next round still count against the coordinator's cap of active leases (we
        cannot say they are finished before that round opens). Under the shared state's lock."""
        return held + len(self.shared.ahead_completed) < (self.max_leases or 1)

    def prefetch(self) -> None:
        """Lease our next shard on a thread, while we train or load theta (if the coordinator's
        cap lets us hold it beside the shard in training)."""
        s = self.shared
        if self.prefetch_task is not None or self.pause.reason():
            return
        with s.lock:
            room = s.next_shard is None and self.room_locked(0 if s.shard is None else 1)
        if room:
            self.prefetch_task = Task(lambda: self.request(ahead=True), "prefetch")

    def settle_prefetch(self) -> None:
        """Wait for a lease asked ahead (so that what we give back includes it)."""
        task, self.prefetch_task = self.prefetch_task, None
        if task is not None:
            task.done.wait()
            if isinstance(task.error, Stopped):
                raise task.error
            if task.error is not None:  # we ask again, now
                log.warning("leasing the next shard ahead failed: %s", download.why(task.error))

    def put_down(self) -> None:
        """Give back the shard in training and the one leased ahead (we pause)."""
        self.settle_prefetch()
        ids = self.shared.take_shards()
        if ids:
            self.client.release(ids)

    def give_back(self, why: str) -> None:
        """Give back every lease we hold: its training will not be credited."""
        self.settle_prefetch()
        ids = self.shared.lease_ids()
        if ids:
            self.client.release(ids)
            log.info("%s: returned %d lease(s)", why, len(ids))
        self.shared.forget_leases()
