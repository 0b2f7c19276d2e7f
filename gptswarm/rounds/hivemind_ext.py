"""Everything gptswarm changes in hivemind, in one place, against one pinned version.

gptswarm runs hivemind's all-reduce (AllReduceRunner, with its part splitting, streaming and
compression) over hivemind's libp2p transport, but not its DHT matchmaking: the coordinator forms
each round's group from its ledger and hands it to the workers over gRPC (averaging.py). The
subclasses below change the all-reduce; methods copied from hivemind and then edited say which
file and function they come from and what changed, so that a hivemind upgrade is a diff against
those functions. Nothing here replaces a hivemind class or module attribute.

What the changes do:
- identical results: the reducer sends every groupmate the same compressed average of its part (and
  applies the same round trip to its own copy), instead of per-peer deltas, so all peers of a
  group end with bit-identical averaged pseudo-gradients and can take the same outer step;
- weights from the ledger: the reducer weighs each sender by what the coordinator assigned it, never
  by the weight a message claims;
- validation: the reducer excludes a sender whose part is malformed, not finite or absurdly large
  (as hivemind already excludes senders that time out), and reports it;
- robust aggregation: the coordinator's reducer holds every sender's copy of a part and reduces
  them with gptswarm/rounds/robust.py's rule instead of a weighted sum;
- admission: only the group's members may send, each once (RoundServicer);
- no partial results: a peer whose all-reduce lost the reducer's part fails instead of returning
  its own values as part of "the average";
- codecs: gptswarm's own (codecs.py: 4-bit, sparse top-k) travel beside hivemind's, every
  receiver decodes with codecs.decode, sized by the parts it expects; in a top-k run the reducer
  refuses a part denser than the run's fraction;
- accounting: the bytes of every message this peer sends in an all-reduce are counted.
"""

import asyncio
import math
import warnings
from typing import AsyncIterator

import torch

from gptswarm.errors import UserError
from gptswarm.rounds import COMPRESSIONS
from gptswarm.rounds.robust import aggregate_part

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"hivemind\..*")
warnings.filterwarnings("ignore", message=".*Conversion of an array with ndim > 0 to a scalar.*")

import hivemind  # noqa: E402

HIVEMIND_VERSION = "1.1.12"  # the version the code below was copied from and tested against
if hivemind.__version__ != HIVEMIND_VERSION:
    raise UserError(f"gptswarm needs hivemind=={HIVEMIND_VERSION} (gptswarm/rounds/hivemind_ext.py adapts its "
                    f"all-reduce), but hivemind {hivemind.__version__} is installed: "
                    f"pip install hivemind=={HIVEMIND_VERSION}")

from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode  # noqa: E402
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer  # noqa: E402
from hivemind.compression import (CompressionInfo, Float16Compression, NoCompression,  # noqa: E402
                                  Uniform8BitQuantization)
from hivemind.p2p import P2PContext, ServicerBase  # noqa: E402
from hivemind.proto import averaging_pb2  # noqa: E402
from hivemind.utils.asyncio import (achain, aiter_with_timeout, amap_in_executor, anext, as_aiter,  # noqa: E402
                                    attach_event_on_finished)

from gptswarm.rounds.codecs import CHUNK, Blockwise4Bit, Sparse8Bit, decode  # noqa: E402

# codec name -> (the contributions' codec, the reducer's replies' codec), each made for the run's top-k fraction
CODECS = {"none": lambda f: (NoCompression(), NoCompression()),
          "fp16": lambda f: (Float16Compression(), Float16Compression()),
          "8bit": lambda f: (Uniform8BitQuantization(), Uniform8BitQuantization()),
          "4bit": lambda f: (Blockwise4Bit(), Blockwise4Bit()),
          "topk": lambda f: (Sparse8Bit(f), Sparse8Bit(f, dense_fallback=True))}
assert tuple(CODECS) == COMPRESSIONS
MAX_ABS = 1e4  # a pseudo-gradient entry beyond this is not a real contribution
FIRST_MESSAGE_TIMEOUT = 10.0  # seconds a caller of rpc_aggregate_part has to say which group it is in

__all__ = ["AveragingMode", "CODECS", "RobustReducer", "RoundServicer", "SwarmAllReduceRunner", "ValidatingReducer"]


class ValidatingReducer(TensorPartReducer):
    """TensorPartReducer that refuses a sender's part that cannot be a real pseudo-gradient: the
    sender is then treated as failed (excluded from the average) and reported on `report`."""

    def __init__(self, part_shapes, num_senders, sender_peer_ids, report, max_density=None):
        super().__init__(part_shapes, num_senders)
        self.sender_peer_ids, self.report, self.max_density = sender_peer_ids, report, max_density
        self.probe = None  # coordinator/scoring.py's Probe: takes every valid part's dot products (runner sets it)

    def on_sender_failed(self, sender_index):
        if self.sender_failed_after[sender_index] == float("inf"):  # the first failure counts
            super().on_sender_failed(sender_index)
            self.end_empty_parts()

    def check_current_part_finished(self):
        self.check_part()
        self.end_empty_parts()

    def check_part(self):
        super().check_current_part_finished()

    def end_empty_parts(self):
        # hivemind waits for a part that no sender is left to send (every sender failed; a reducer node
        # is no sender of its own) until the all-reduce times out: such parts end now, empty
        while not self.finished.is_set() and self.num_current_senders == 0:
            self.check_part()

    def reason_to_reject(self, part_index, part, weight):
        if not (math.isfinite(weight) and weight >= 0):
            return f"invalid weight {weight}"
        if not 0 <= part_index < self.num_parts or part.shape != self.part_shapes[part_index]:
            return f"malformed part {part_index} of shape {tuple(part.shape)}"
        if part.numel():  # one pass: a NaN makes both ends NaN, an infinity one of them infinite
            low, high = (float(v) for v in torch.aminmax(part))
            if not (math.isfinite(low) and math.isfinite(high)):
                return "non-finite values in its pseudo-gradient"
            if max(-low, high) > MAX_ABS:
                return f"pseudo-gradient entries beyond {MAX_ABS:g}"
        if self.max_density is not None:  # top-k: what the worker's sparsify() keeps, per CHUNK values
            # a part may cut two chunks, each with its whole top-k inside the part (hivemind aligns parts
            # with chunks only while the codec's estimate keeps parts at 2**20 values: fractions <= 1/6)
            nonzero = int(torch.count_nonzero(part))
            edges = 2 * math.ceil(self.max_density * CHUNK)
            allowed = self.max_density * part.numel() + part.numel() / CHUNK + edges + 1
            if nonzero > allowed:
                return (f"{nonzero} nonzero values in a part of {part.numel()}, denser than the run's top-k "
                        f"({self.max_density:g})")
        return None

    def validate(self, sender_index, part_index, tensor_part, weight):
        if self.sender_failed_after[sender_index] == float("inf"):
            reason = self.reason_to_reject(part_index, tensor_part, weight)
            if reason is not None:
                self.on_sender_failed(sender_index)
                self.report.append((str(self.sender_peer_ids[sender_index]), reason))
                raise BannedException(f"sender {sender_index} rejected: {reason}")
            if self.probe is not None:
                self.probe.take(sender_index, part_index, tensor_part)

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):
        self.validate(sender_index, part_index, tensor_part, weight)
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight=weight)


class RobustReducer(ValidatingReducer):
    """ValidatingReducer that holds every sender's copy of the current part and reduces them with
    gptswarm/rounds/robust.py's rule instead of a running weighted sum. keys: a name per sender
    (None: leave it out, as the coordinator's own zeros); weights: per sender (read when the part
    is reduced); history, scores and stats: robust.History, {key: robust.PartScores} and robust.RoundStats;
    scales: per sender, what its weight is scaled by in the aggregate alone (robust.aggregate_part)."""

    def __init__(self, part_shapes, num_senders, sender_peer_ids, report, max_density=None, *, keys, weights,
                 history, scores, stats=None, encode=None, scales=None):
        self.received = {}
        super().__init__(part_shapes, num_senders, sender_peer_ids, report, max_density)
        self.keys, self.weights, self.history, self.scores, self.stats = keys, weights, history, scores, stats
        self.scales = scales
        self.encode = encode  # encode(part_index, average) -> the reply's serialized bytes, kept for every sender

    def reset_accumulators(self):
        # from hivemind/averaging/partition.py, TensorPartReducer.reset_accumulators; changed: the
        # senders' copies of the part are kept (self.received) instead of a running sum
        assert self.current_part_accumulated_from == self.num_current_senders or self.current_part_index == -1
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < failed for failed in self.sender_failed_after)
        self.received = {}

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):
        # from hivemind/averaging/partition.py, TensorPartReducer.accumulate_part; changed: the part is
        # validated first, then kept (not added to a sum)
        self.validate(sender_index, part_index, tensor_part, weight)
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.received[sender_index] = tensor_part
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_part(self):
        # from hivemind/averaging/partition.py, TensorPartReducer.check_current_part_finished; changed:
        # the part is reduced by robust.aggregate_part over the senders with a key and a weight
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            p = self.current_part_index
            members = [i for i in sorted(self.received) if self.keys[i] is not None and self.weights[i] > 0
                       and p < self.sender_failed_after[i]]
            try:
                if members:  # the rule remembers the average as members receive it: the reply, encoded once here
                    roundtrip = None if self.encode is None else (
                        lambda average: decode(self.encode(p, average), average.numel()))
                    result = aggregate_part(p, [self.received[i] for i in members],
                                            [self.weights[i] for i in members], [self.keys[i] for i in members],
                                            self.history, self.scores, self.stats, roundtrip=roundtrip,
                                            scales=None if self.scales is None else [self.scales[i] for i in members])
                else:
                    result = torch.zeros(self.part_shapes[p])
            except Exception as e:  # the round fails now, with the reason, instead of at its timeout
                self.current_part_future.set_exception(AllreduceException(f"the robust rule failed on part {p}: "
                                                                          f"{type(e).__name__}: {e}"))
                self.finalize()
                return
            self.current_part_future.set_result(result)
            self.reset_accumulators()


class SwarmAllReduceRunner(AllReduceRunner):
    """AllReduceRunner whose reducer hands every sender the same bytes: the compressed average, each
    sender weighed by `sender_weights` (aligned with sender_peer_ids) when given, reduced by the
    robust rule when `robust` is given (RobustReducer's keys, history and scores).

    codecs: (the contributions', the replies') CompressionBase; max_density: a top-k run's fraction;
    probe, probe_keys: coordinator/scoring.py's Probe and each sender's worker id (the reducer scores).
    After a run: bytes_sent (this peer's messages), rejections [(peer id, reason)], and with
    sender_weights, claimed_weights {peer id: the weight its first message claimed}."""

    def __init__(self, *, codecs, sender_weights=None, robust=None, max_density=None, probe=None, probe_keys=None,
                 **kwargs):
        super().__init__(compression=codecs[0], **kwargs)
        self.sender_weights = sender_weights
        self.claimed_weights = {}
        self.bytes_sent = self.bytes_received = 0  # this peer's messages out, and the senders' in (as a reducer)
        self.rejections = []
        self.tensor_part_container.return_deltas = False  # a failed reducer leaves our own values
        shapes = tuple(p.shape for p in self.parts_for_local_averaging)
        if robust is None:
            self.tensor_part_reducer = ValidatingReducer(shapes, len(self.sender_peer_ids), self.sender_peer_ids,
                                                         self.rejections, max_density)
        else:  # {keys, history, scores, stats}: robust aggregation, weighed by sender_weights
            self.tensor_part_reducer = RobustReducer(shapes, len(self.sender_peer_ids), self.sender_peer_ids,
                                                     self.rejections, max_density, weights=sender_weights,
                                                     encode=self._encode_now, **robust)
        if probe is not None:  # probe_keys: each sender's worker id (None: not a member)
            probe.bind(probe_keys, [int(p.numel()) for p in self.parts_for_local_averaging])
            self.tensor_part_reducer.probe = probe
        self._codec = codecs[0].compression_type
        self._reply_codec = codecs[1]
        self._replies = {}  # part index -> future of its reply's serialized bytes (the event loop's alone)
        # the most values a part can have (the reducer's parts, and this peer's own: the same partition)
        self._max_part = max([p.numel() for p in self.parts_for_local_averaging] +
                             [p.numel() for parts in self.tensor_part_container._input_parts_by_peer for p, _ in parts]
                             + [1])
        self._replies_closed = set()  # sender indices whose reply stream has ended or holds every part

    def finalize(self, *, cancel=False, exception=None):
        # hivemind's AllReduceRunner.finalize, called with the CancelledError of a peer that stops
        # mid-averaging (a worker's Ctrl+C), stores it in a future nobody reads, which asyncio then logs
        # as a traceback: a cancellation cancels the future instead
        if isinstance(exception, asyncio.CancelledError):
            cancel, exception = True, None
        super().finalize(cancel=cancel, exception=exception)

    async def replies_sent(self, timeout):
        """Wait (up to `timeout` s) until every other sender has its last reply counted, its stream
        has ended, or it has been excluded: only then does bytes_sent hold every reply sent."""
        reducer = self.tensor_part_reducer
        own = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else -1
        deadline = asyncio.get_event_loop().time() + timeout
        while any(i != own and i not in self._replies_closed and reducer.sender_failed_after[i] == float("inf")
                  for i in range(len(self.sender_peer_ids))):
            if asyncio.get_event_loop().time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _count(self, msg):
        self.bytes_sent += msg.ByteSize()
        return msg

    def _serialize_average(self, averaged):
        return self._reply_codec.compress(averaged, CompressionInfo.from_tensor(averaged))

    def _encode_now(self, part_index, averaged):
        """The part's reply, encoded on the event loop now (the robust rule, which runs there, needs it)."""
        future = self._replies[part_index] = asyncio.get_event_loop().create_future()
        future.set_result(self._serialize_average(averaged))
        return future.result()

    async def _reply(self, part_index, averaged):
        """The part's reply in the run's codec, encoded once (off the event loop) however many senders
        wait for it: every sender receives the same bytes."""
        future = self._replies.get(part_index)
        if future is None:
            future = self._replies[part_index] = asyncio.get_event_loop().run_in_executor(
                None, self._serialize_average, averaged)
        return await asyncio.shield(future)  # a sender that leaves does not cancel the others' reply

    def sent_every_part(self, peer_id):
        """Did this sender deliver all of its parts, and was it never excluded?"""
        i = self.sender_peer_ids.index(peer_id)
        reducer = self.tensor_part_reducer
        return reducer.sender_failed_after[i] == float("inf") and reducer.num_parts_received[i] == reducer.num_parts

    async def _generate_input_for_peer(self, peer_index):
        async for msg in super()._generate_input_for_peer(peer_index):
            yield self._count(msg)

    async def _communicate_with_peer(self, peer_id):
        # from hivemind/averaging/allreduce.py, AllReduceRunner._communicate_with_peer, the branch for
        # peer_id == self.peer_id; changed: our own part goes through the same serialization as the
        # groupmates' copies, and the container receives the average itself, not a delta
        if peer_id != self.peer_id:
            return await self._communicate_with_reducer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, part in enumerate(self.parts_for_local_averaging):
            averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=self.weight)
            serialized = await self._reply(part_index, averaged)
            self.tensor_part_container.register_processed_part(peer_index, part_index,
                                                               decode(serialized, self._max_part))

    async def _communicate_with_reducer(self, peer_id):
        # from hivemind/averaging/allreduce.py, AllReduceRunner._communicate_with_peer, the branch for
        # another peer; changed: replies are decoded by codecs.decode (gptswarm's codecs too), no
        # larger than our own parts, and a reply of another kind than AVERAGED_PART fails the peer
        peer_index = self.ordered_peer_ids.index(peer_id)
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            part_index = 0

            def _decode(msg):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                return decode(msg.tensor_part, self._max_part)

            async for averaged in amap_in_executor(_decode, aiter_with_timeout(stream, self.reducer_timeout),
                                                   max_prefetch=self.tensor_part_container.prefetch):
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
                part_index += 1
            if part_index != self.tensor_part_container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, but we expected "
                                         f"{self.tensor_part_container.num_parts_by_peer[peer_index]}")
        except BaseException:
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream, sender_index):
        # from hivemind/averaging/allreduce.py, AllReduceRunner._accumulate_parts_streaming; changed:
        # the sender's weight is sender_weights[sender_index] when given (not the message's), a part
        # in another codec or that does not decode is refused, the reply is the (cached) serialized average instead of
        # `averaged_part - tensor_part`, and every reply is counted
        part_index = 0
        peer = self.sender_peer_ids[sender_index]

        def weight_of(msg):
            if self.sender_weights is None:
                return msg.weight
            self.claimed_weights.setdefault(peer, msg.weight)
            return self.sender_weights[sender_index]
        def decoded(msg):
            try:
                return (decode(msg.tensor_part, self._max_part), weight_of(msg), msg.tensor_part.compression,
                        msg.ByteSize())
            except Exception as e:  # the codec's own errors, or hivemind's on a malformed buffer
                return None, f"{type(e).__name__}: {e}"[:200], msg.tensor_part.compression, msg.ByteSize()

        def reject(reason):
            self.tensor_part_reducer.on_sender_failed(sender_index)
            self.rejections.append((str(self.sender_peer_ids[sender_index]), reason))
        try:
            async for part, weight, codec, size in amap_in_executor(decoded, stream,
                                                                    max_prefetch=self.tensor_part_container.prefetch):
                self.bytes_received += size
                if codec != self._codec:
                    reject("a contribution in another codec than the run's")
                    break
                if part is None:
                    reject(f"a malformed part: {weight}")
                    break
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                              weight=weight)
                except BannedException:
                    break
                serialized = await self._reply(part_index, averaged)
                part_index += 1
                reply = self._count(averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                                tensor_part=serialized))
                if part_index == self.tensor_part_reducer.num_parts:
                    self._replies_closed.add(sender_index)
                yield reply
        finally:
            self._replies_closed.add(sender_index)
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class RoundServicer(ServicerBase):
    """The coordinator's only hivemind endpoint: the all-reduce's rpc_aggregate_part, routed to the
    round being averaged, and only for the peers admitted to its group, one stream each.
    on_refused(peer_id, reason) hears of every other caller. Workers use this class's stub.
    Threads: `runner` is set and read on the node's event loop only (RoundReducer._reduce, this
    handler, RoundReducer.set_weight's update)."""

    def __init__(self, on_refused=lambda peer_id, reason: None, group_wait=0.0):
        self.group_wait = group_wait  # seconds a sender may wait for its round's runner (a reducer node
        #                               learns of a round over gRPC, members may dial it a moment before)
        self.runner = None  # the SwarmAllReduceRunner of the round being averaged, if any
        self.admit = None  # async admit(peer id): awaited before an admitted sender's stream is read (its weight)
        self.on_refused = on_refused

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        peer = context.remote_id
        try:
            first = await asyncio.wait_for(anext(stream), FIRST_MESSAGE_TIMEOUT)
        except (asyncio.TimeoutError, StopAsyncIteration):
            self.on_refused(str(peer), "opened an averaging stream and sent nothing")
            return
        runner = self.runner
        deadline = asyncio.get_event_loop().time() + self.group_wait
        while (runner is None or first.group_id != runner.group_id) and asyncio.get_event_loop().time() < deadline:
            await asyncio.sleep(0.05)
            runner = self.runner
        if runner is None or first.group_id != runner.group_id:
            self.on_refused(str(peer), "sent a contribution for no round being averaged")
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        if peer == runner.peer_id or peer not in runner.sender_peer_ids:
            self.on_refused(str(peer), "is not a member of the round's averaging group")
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if peer in runner.active_senders or peer in runner.banned_senders:
            self.on_refused(str(peer), "sent its contribution twice")
            yield averaging_pb2.AveragingData(code=averaging_pb2.DUPLICATE_PEER_ID)
            return
        if self.admit is not None:
            await self.admit(peer)
        async for msg in runner.rpc_aggregate_part(achain(as_aiter(first), stream), context):
            yield msg
