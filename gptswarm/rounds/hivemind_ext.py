"""Everything gptswarm changes in hivemind, in one place, against one pinned version.

gptswarm subclasses hivemind 1.1.12's DecentralizedAverager, its AllReduceRunner, its
TensorPartReducer and its GroupKeyManager. Methods copied from hivemind and then edited say which
file and function they come from and what changed, so that a hivemind upgrade is a diff against
those functions. Nothing here replaces a hivemind class or module attribute: the subclasses are
used only where gptswarm builds its own averager.

What the changes do:
- identical results: a reducer sends every groupmate the same compressed average of its part (and
  applies the same round trip to its own copy), instead of per-peer deltas, so all peers of a
  group end with bit-identical averaged pseudo-gradients and can take the same outer step;
- validation: a reducer excludes a sender whose part is not finite (or absurdly large) from the
  average, as hivemind already does for senders that time out, and reports it;
- no partial results: a peer whose all-reduce lost a reducer's part fails the step instead of
  returning its own values as part of "the average";
- accounting: the bytes of every message this peer sends in an all-reduce are counted;
- matchmaking polls the DHT twice a second instead of busy-looping;
- the leader's group size can be changed between steps.
"""

import asyncio
import contextlib
import math
import multiprocessing as mp
import signal
import threading
import time
import warnings

import torch

from gptswarm.errors import UserError
from gptswarm.rounds import COMPRESSIONS

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"hivemind\..*")
warnings.filterwarnings("ignore", message=".*Conversion of an array with ndim > 0 to a scalar.*")

import hivemind  # noqa: E402

HIVEMIND_VERSION = "1.1.12"  # the version the code below was copied from and tested against
if hivemind.__version__ != HIVEMIND_VERSION:
    raise UserError(f"gptswarm needs hivemind=={HIVEMIND_VERSION} (gptswarm/rounds/hivemind_ext.py adapts its "
                    f"averaging internals), but hivemind {hivemind.__version__} is installed: "
                    f"pip install hivemind=={HIVEMIND_VERSION}")

from hivemind.averaging import DecentralizedAverager  # noqa: E402
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
assert tuple(CODECS) == COMPRESSIONS
MAX_ABS = 1e4  # a pseudo-gradient entry beyond this is not a real contribution


@contextlib.contextmanager
def keep_sigint():
    """hivemind's averager sets SIGINT to SIG_IGN in the calling process before it forks
    (DecentralizedAverager.run_in_background), and never puts it back; keep the caller's handler so
    that Ctrl+C still works."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


class ThrottledKeyManager(GroupKeyManager):
    """hivemind's matchmaking polls the DHT for leaders every 1-2 ms while it finds none (measured:
    8 CPU-seconds in 10 s for one waiting worker); twice a second is plenty."""

    min_interval = 0.5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_poll = 0.0

    async def get_averagers(self, group_key, only_active):
        delay = self._last_poll + self.min_interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._last_poll = time.monotonic()
        return await super().get_averagers(group_key, only_active)


class ValidatingReducer(TensorPartReducer):
    """TensorPartReducer that refuses a sender's part that cannot be a real pseudo-gradient: the
    sender is then treated as failed (excluded from the average) and reported on `report`."""

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
    """AllReduceRunner whose reducers hand every sender the same bytes: the compressed average."""

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
        # from hivemind/averaging/allreduce.py, AllReduceRunner._communicate_with_peer, the branch for
        # peer_id == self.peer_id; changed: our own part goes through the same serialization as the
        # groupmates' copies, and the container receives the average itself, not a delta
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
        # from hivemind/averaging/allreduce.py, AllReduceRunner._accumulate_parts_streaming; changed:
        # the reply is the (cached) serialized average instead of `averaged_part - tensor_part`, and
        # every reply is counted
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


class Counters:
    """Shared with the averager's process: bytes sent, and (peer id, reason) of rejected senders."""

    def __init__(self):
        ctx = mp.get_context("fork")
        self.bytes_sent = ctx.Value("q", 0)
        self.rejections = ctx.SimpleQueue()

    def drain_rejections(self):
        out = []
        while not self.rejections.empty():
            out.append(self.rejections.get())
        return out


class SwarmDecentralizedAverager(DecentralizedAverager):
    """DecentralizedAverager running SwarmAllReduceRunner, with a throttled key manager and a leader
    group size that can change between steps. Build it inside keep_sigint()."""

    def __init__(self, *args, **kwargs):
        self.counters = Counters()  # made before the averager process forks
        super().__init__(*args, **kwargs)
        self._call("_throttle_matchmaking")

    def _call(self, method, **kwargs):
        """Run `method` in the averager's process (its event loop) and wait for it."""
        future = MPFuture()
        self._outer_pipe.send((method, [], dict(kwargs, future=future)))
        return future.result()

    async def _throttle_matchmaking(self, future):
        old = self._matchmaking.group_key_manager
        self._matchmaking.group_key_manager = ThrottledKeyManager(self.dht, old.prefix, old.group_bits,
                                                                  old.target_group_size)
        future.set_result(None)

    def set_group_size(self, size):
        """Start the next group's all-reduce as soon as it has `size` members (the leader's
        matchmaking window is then only the upper bound)."""
        self._call("_set_group_size", size=size)

    async def _set_group_size(self, size, future):
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        # from hivemind/averaging/averager.py, DecentralizedAverager._run_allreduce_inplace_; changed:
        # SwarmAllReduceRunner instead of AllReduceRunner, the averaged values are copied in (not
        # added as deltas), and a step that lost a reducer's part raises instead of succeeding
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
