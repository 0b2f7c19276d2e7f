"""Round averaging through hivemind, shared by the coordinator and the workers.

Four changes to hivemind 1.1.12's DecentralizedAverager, each small and local to its all-reduce:
- identical results: a reducer sends every groupmate the same compressed average of its part (and
  applies the same round trip to its own copy), instead of per-peer deltas, so all peers of a
  group end with bit-identical averaged pseudo-gradients and can take the same outer step;
- validation: a reducer excludes a sender whose part is not finite (or absurdly large) from the
  average, as hivemind already does for senders that time out, and reports it;
- accounting: the bytes of every message this peer sends in an all-reduce are counted;
- matchmaking polls the DHT twice a second instead of busy-looping.
Rounds are kept apart by the group key: the round number is the averager's group bits.
"""

import asyncio
import contextlib
import math
import multiprocessing as mp
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from gptswarm.errors import UserError

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"hivemind\..*")
warnings.filterwarnings("ignore", message=".*Conversion of an array with ndim > 0 to a scalar.*")

import hivemind  # noqa: E402
from hivemind.averaging import DecentralizedAverager, matchmaking  # noqa: E402
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode  # noqa: E402
from hivemind.averaging.key_manager import GroupKeyManager  # noqa: E402
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer  # noqa: E402
from hivemind.compression import (Float16Compression, NoCompression, Uniform8BitQuantization,  # noqa: E402
                                  deserialize_torch_tensor, serialize_torch_tensor)
from hivemind.proto import averaging_pb2  # noqa: E402
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip  # noqa: E402
from hivemind.utils.mpfuture import MPFuture  # noqa: E402
from hivemind.utils.timed_storage import get_dht_time  # noqa: E402

CODECS = {"none": NoCompression, "fp16": Float16Compression, "8bit": Uniform8BitQuantization}
MAX_ABS = 1e4  # a pseudo-gradient entry beyond this is not a real contribution
ROUND_BITS = 24


def round_bits(round_):
    return format(round_ % (1 << ROUND_BITS), f"0{ROUND_BITS}b")


@contextlib.contextmanager
def keep_sigint():
    """hivemind's averager sets SIGINT to SIG_IGN in the calling process before it forks, and never
    puts it back; keep the caller's handler so that Ctrl+C still works."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def start_dht(listen="0.0.0.0:0", initial_peers=(), client_mode=False, announce_host=None, identity_path=None):
    """A hivemind DHT peer. listen is HOST:PORT for incoming connections (ignored in client mode);
    identity_path keeps the peer id across restarts (the coordinator's must not change)."""
    host, _, port = listen.rpartition(":")
    kwargs = {"identity_path": str(identity_path)} if identity_path else {}
    if not client_mode:
        kwargs["host_maddrs"] = [f"/ip4/{host or '0.0.0.0'}/tcp/{port or 0}"]
        if announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    try:
        return hivemind.DHT(start=True, initial_peers=list(initial_peers), client_mode=client_mode, **kwargs)
    except Exception as e:
        raise UserError(f"cannot start the hivemind peer on {listen}: {str(e).splitlines()[0][:200]}") from None


class ThrottledKeyManager(GroupKeyManager):
    """hivemind's matchmaking polls the DHT for leaders every 1-2 ms while it finds none (measured:
    8 CPU-seconds in 10 s for one waiting worker); twice a second is plenty."""

    min_interval = 0.5

    async def get_averagers(self, group_key, only_active):
        delay = getattr(self, "_last_poll", 0.0) + self.min_interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._last_poll = time.monotonic()
        return await super().get_averagers(group_key, only_active)


matchmaking.GroupKeyManager = ThrottledKeyManager  # the name Matchmaking builds its key manager with


class ValidatingReducer(TensorPartReducer):
    def __init__(self, part_shapes, num_senders, sender_peer_ids, report):
        super().__init__(part_shapes, num_senders)
        self.sender_peer_ids, self.report = sender_peer_ids, report

    def on_sender_failed(self, sender_index):
        if self.sender_failed_after[sender_index] == float("inf"):  # the first failure counts
            super().on_sender_failed(sender_index)

    @staticmethod
    def reason_to_reject(part, weight):
        if not (math.isfinite(weight) and weight >= 0):
            return f"invalid weight {weight}"
        if not torch.isfinite(part).all():
            return "non-finite values in its pseudo-gradient"
        if part.numel() and part.abs().max() > MAX_ABS:
            return f"pseudo-gradient entries beyond {MAX_ABS:g}"
        return None

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):
        if self.sender_failed_after[sender_index] == float("inf"):
            reason = self.reason_to_reject(tensor_part, weight)
            if reason is not None:
                self.on_sender_failed(sender_index)
                self.report.put((str(self.sender_peer_ids[sender_index]), reason))
                raise BannedException(f"sender {sender_index} rejected: {reason}")
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight=weight)


class SwarmAllReduceRunner(AllReduceRunner):
    def __init__(self, *, counters, **kwargs):
        super().__init__(**kwargs)
        self.counters = counters
        self.tensor_part_container.return_deltas = False  # a failed reducer leaves our own values
        self.tensor_part_reducer = ValidatingReducer(
            tuple(p.shape for p in self.parts_for_local_averaging), len(self.sender_peer_ids),
            self.sender_peer_ids, counters.rejections)
        self._codec = self.tensor_part_container.compression.compression_type
        self._serialized = {}

    def _count(self, msg):
        with self.counters.bytes_sent.get_lock():
            self.counters.bytes_sent.value += msg.ByteSize()
        return msg

    def _serialize_average(self, part_index, averaged, codec):
        """One serialization per part: every sender receives the same bytes."""
        key = (part_index, codec)
        if key not in self._serialized:
            self._serialized[key] = serialize_torch_tensor(averaged, codec)
        return self._serialized[key]

    async def _generate_input_for_peer(self, peer_index):
        async for msg in super()._generate_input_for_peer(peer_index):
            yield self._count(msg)

    async def _communicate_with_peer(self, peer_id):
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        loop = asyncio.get_event_loop()
        for part_index, part in enumerate(self.parts_for_local_averaging):
            averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=self.weight)
            serialized = await loop.run_in_executor(None, self._serialize_average, part_index, averaged, self._codec)
            self.tensor_part_container.register_processed_part(peer_index, part_index,
                                                               deserialize_torch_tensor(serialized))

    async def _accumulate_parts_streaming(self, stream, sender_index):
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for part, weight, codec in amap_in_executor(
                    lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                    stream, max_prefetch=self.tensor_part_container.prefetch):
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                              weight=weight)
                except BannedException:
                    break
                serialized = await loop.run_in_executor(None, self._serialize_average, part_index, averaged, codec)
                part_index += 1
                yield self._count(averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized))
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class _Counters:
    def __init__(self):
        ctx = mp.get_context("fork")
        self.bytes_sent = ctx.Value("q", 0)
        self.rejections = ctx.SimpleQueue()


class _Averager(DecentralizedAverager):
    def __init__(self, *args, **kwargs):
        self.counters = _Counters()  # made before the averager process forks
        super().__init__(*args, **kwargs)

    def set_group_size(self, size):
        """Start the next group's all-reduce as soon as it has `size` members (the leader's
        matchmaking window is then only the upper bound)."""
        future = MPFuture()
        self._outer_pipe.send(("_set_group_size", [], dict(size=size, future=future)))
        return future.result()

    async def _set_group_size(self, size, future):
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = SwarmAllReduceRunner(counters=self.counters, p2p=self._p2p, servicer_type=type(self),
                                      prefix=self.prefix, tensors=tensors, group_id=group_id,
                                      ordered_peer_ids=group_info.peer_ids, **kwargs)
        assert group_id in self._running_groups
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, averaged in azip(as_aiter(*tensors), runner):
                tensor.copy_(averaged)
            container = runner.tensor_part_container
            if container.failed_size:  # a reducer failed: part of "the average" is only our own values
                raise AllreduceException(f"lost {container.failed_size / container.total_size:.1%} of the average "
                                         "(a reducer failed)")
            self.last_updated = get_dht_time()
            self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


@dataclass
class Outcome:
    ok: bool
    averaged: dict = field(default_factory=dict)
    members: list = field(default_factory=list)  # what each groupmate sent with `gather`
    rejected: dict = field(default_factory=dict)  # worker_id -> reason, as seen by this peer's reducer
    bytes_sent: int = 0
    error: str = ""


class SwarmAverager:
    """Averages {name: tensor} dicts of a fixed schema with the other peers of the same round."""

    def __init__(self, dht, template, prefix, compression="fp16", client_mode=False, matchmaking_time=5.0,
                 target_group_size=256, next_chunk_timeout=10.0):
        self.names = list(template)
        tensors = [torch.zeros(template[k].shape, dtype=torch.float32) for k in self.names]
        with keep_sigint():
            self.av = _Averager(tensors, dht, prefix=prefix, start=True, target_group_size=target_group_size,
                                min_group_size=2, min_matchmaking_time=matchmaking_time,
                                request_timeout=max(0.5, matchmaking_time / 2),
                                next_chunk_timeout=next_chunk_timeout,  # a stalled peer is dropped, not waited for
                                compression=CODECS[compression](), client_mode=client_mode,
                                initial_group_bits=round_bits(0))
        self.bytes_sent_total = 0
        self.cancel_grace = max(0.5, matchmaking_time / 2) + 0.5  # one matchmaking request_timeout, and some

    def average(self, tensors, weight, round_, worker_id, timeout, give_up=None, group_size=None):
        """Average `tensors` (weighted) with the round's group; gives up early once `give_up()` is
        true. A leader given `group_size` closes the group once that many peers are in (else at the
        end of its matchmaking window). Never raises for network trouble: the Outcome says what
        happened."""
        av = self.av
        av.set_group_bits(round_bits(round_))
        if group_size:
            av.set_group_size(group_size)
        with av.get_tensors() as local:
            for t, k in zip(local, self.names):
                t.copy_(tensors[k])
        self._drain()
        before = av.counters.bytes_sent.value
        try:
            control = av.step(weight=float(weight), timeout=timeout, wait=False,
                              gather={"worker_id": worker_id, "round": round_, "tokens": int(weight)})
            while not control.done():
                if give_up is not None and give_up():
                    control.cancel()
                    # the cancel reaches the averager process asynchronously: let it drop the step
                    # before anyone re-keys the averager for the next round
                    time.sleep(self.cancel_grace)
                    return Outcome(False, error="gave up: stopping, or the round is over")
                time.sleep(0.05)
            gathered = control.result()
            error = "" if gathered else "no averaging group formed"
        except Exception as e:  # matchmaking or all-reduce failure: the round goes on without us
            gathered, error = None, f"averaging failed: {type(e).__name__}: {e}"[:300]
        sent = av.counters.bytes_sent.value - before
        self.bytes_sent_total += sent
        if not gathered:
            return Outcome(False, bytes_sent=sent, error=error)
        by_peer = {str(p): g for p, g in gathered.items()}
        members = [g for g in by_peer.values() if isinstance(g, dict)]
        rejected = {by_peer.get(p, {}).get("worker_id", p): reason for p, reason in self._drain()}
        if any(m.get("round") != round_ for m in members):
            return Outcome(False, members=members, bytes_sent=sent, error="group mixed several rounds")
        with av.get_tensors() as local:
            averaged = {k: t.clone() for k, t in zip(self.names, local)}
        return Outcome(True, averaged, members, rejected, sent)

    def _drain(self):
        out = []
        q = self.av.counters.rejections
        while not q.empty():
            out.append(q.get())
        return out

    def shutdown(self):
        self.av.shutdown()
