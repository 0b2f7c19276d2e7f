"""Pseudo-gradient codecs beyond hivemind's own (none, fp16, 8bit), in hivemind's CompressionBase
form so that its all-reduce splits, streams and counts them like its own:

- "4bit": blocks of BLOCK4 values, each a bfloat16 scale (its largest magnitude / 7) and 4-bit codes
  for -7..7, rounded to nearest (Streaming DiLoCo's 4-bit, without its error feedback): 0.53 bytes
  per value, 7.5x fewer than fp32.
- "topk": the worker keeps the largest `fraction` of each CHUNK values of its pseudo-gradient plus
  what it left out before (error feedback, sparsify() below: SparseLoCo, DeMo), and the codec sends
  only nonzeros, each CHUNK values as a count, a bfloat16 scale and (uint16 index, int8 value) pairs:
  3 bytes per kept value, so 3% kept is 0.09 bytes per value, 44x fewer than fp32. The reducer's
  reply, the average, has the union of the members' supports: it goes sparse while that is smaller
  than hivemind's 8-bit, else as 8-bit.

Scales are bfloat16, float32's range in two bytes: a float16 scale cannot hold the scale of a
pseudo-gradient whose values are all below about 1e-4 (a round of one or two steps early in the
learning-rate warmup), which then decoded as zeros. A non-finite scale decodes to non-finite values, which the reducer's validation refuses like any
other. hivemind knows these codecs' tags (CODEC_4BIT, CODEC_SPARSE, outside its CompressionType values)
only through decode(), which every gptswarm receiver calls instead of hivemind's
deserialize_torch_tensor; decode() sizes what it builds by what the receiver expects, never by the
sender's claim alone.
"""

import math
import warnings

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo, Uniform8BitQuantization, deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from gptswarm.rounds import DEFAULT_TOPK

BLOCK4 = 64  # values per 4-bit block (one bfloat16 scale each)
CHUNK = 4096  # values per top-k chunk (indices are uint16 within it)
CODEC_4BIT, CODEC_SPARSE = 102, 103  # tags in runtime_pb2.Tensor.compression, beyond hivemind's enum (100 and
#                                     101 were these formats with float16 scales)
TINY = torch.finfo(torch.float32).tiny
warnings.filterwarnings("ignore", message="The given buffer is not writable")  # decode() only reads it


def _scales(amax, levels):
    """Each block's scale (amax / levels) in bfloat16: (the bytes, the scale as it decodes, at least TINY)."""
    scale = (amax / levels).to(torch.bfloat16)
    return scale.view(torch.int16).numpy().tobytes(), scale.float().clamp(min=TINY)


def _read_scales(buffer, count, offset=0):
    bits = np.frombuffer(buffer, dtype="<u2", count=count, offset=offset).astype(np.uint32) << 16
    return bits.view(np.float32)


class DecodeError(ValueError):
    """A serialized tensor that is not what its codec says, or larger than the receiver expects."""


def _numel(serialized, max_numel):
    n = math.prod(serialized.size)
    if not 0 <= n <= max_numel:
        raise DecodeError(f"a tensor of {n} values where at most {max_numel} are expected")
    return n


class Blockwise4Bit(CompressionBase):
    compression_type = CODEC_4BIT

    def compress(self, tensor, info=None, allow_inplace=False):
        flat = tensor.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK4)).view(-1, BLOCK4)
        scale, s = _scales(blocks.abs().amax(1), 7)
        codes = (torch.round(blocks / s[:, None]).clamp(-7, 7) + 8).to(torch.uint8).view(-1)
        packed = codes[0::2] | (codes[1::2] << 4)
        return runtime_pb2.Tensor(compression=CODEC_4BIT, buffer=scale + packed.numpy().tobytes(),
                                  size=tensor.shape, dtype="float32")

    def extract(self, serialized, max_numel=1 << 28):
        n = _numel(serialized, max_numel)
        nblocks = -(-n // BLOCK4)
        if len(serialized.buffer) != nblocks * (2 + BLOCK4 // 2):
            raise DecodeError(f"a 4-bit tensor of {n} values in {len(serialized.buffer)} bytes")
        scale = torch.from_numpy(_read_scales(serialized.buffer, nblocks))
        packed = torch.from_numpy(np.frombuffer(serialized.buffer, dtype=np.uint8, offset=2 * nblocks).copy())
        codes = torch.stack([packed & 15, packed >> 4], 1).view(nblocks, BLOCK4).to(torch.float32) - 8
        return (codes * scale[:, None]).view(-1)[:n].reshape(tuple(serialized.size))

    def estimate_compression_ratio(self, info):
        return (0.5 + 2 / BLOCK4) / 4


class Sparse8Bit(CompressionBase):
    """Nonzeros only (see the module's docstring); `dense_fallback`: serialize as hivemind's 8-bit
    when that is smaller (the reducer's averages)."""
    compression_type = CODEC_SPARSE

    def __init__(self, fraction=DEFAULT_TOPK, dense_fallback=False):
        self.fraction, self.dense_fallback = fraction, dense_fallback

    def compress(self, tensor, info=None, allow_inplace=False):
        flat = tensor.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        if self.dense_fallback and 3 * int(torch.count_nonzero(flat)) + 4 * (-(-n // CHUNK)) > n + 1024:
            return Uniform8BitQuantization().compress(tensor.detach().to(torch.float32),
                                                      info or CompressionInfo.from_tensor(tensor))
        nchunks = -(-n // CHUNK)
        blocks = torch.nn.functional.pad(flat, (0, nchunks * CHUNK - n)).view(nchunks, CHUNK)
        rows, cols = torch.nonzero(blocks, as_tuple=True)  # in row order: chunk by chunk
        scale, s = _scales(blocks.abs().amax(1), 127)
        values = torch.round(blocks[rows, cols] / s[rows]).clamp(-127, 127).to(torch.int8)
        counts = torch.bincount(rows, minlength=nchunks)
        buffer = b"".join((counts.numpy().astype("<u2").tobytes(), scale,
                           cols.numpy().astype("<u2").tobytes(), values.numpy().tobytes()))
        return runtime_pb2.Tensor(compression=CODEC_SPARSE, buffer=buffer, size=tensor.shape, dtype="float32")

    def extract(self, serialized, max_numel=1 << 28):
        n = _numel(serialized, max_numel)
        nchunks = -(-n // CHUNK)
        buf = serialized.buffer
        if len(buf) < 4 * nchunks:
            raise DecodeError(f"a sparse tensor of {n} values in {len(buf)} bytes")
        counts = np.frombuffer(buf, dtype="<u2", count=nchunks).astype(np.int64)
        lengths = np.minimum(CHUNK, n - CHUNK * np.arange(nchunks))
        if (counts > lengths).any():
            raise DecodeError("a sparse chunk with more values than the chunk holds")
        total = int(counts.sum())
        if len(buf) != 4 * nchunks + 3 * total:
            raise DecodeError(f"a sparse tensor of {total} values in {len(buf)} bytes")
        scales = _read_scales(buf, nchunks, offset=2 * nchunks)
        idx = np.frombuffer(buf, dtype="<u2", count=total, offset=4 * nchunks).astype(np.int64)
        vals = np.frombuffer(buf, dtype=np.int8, count=total, offset=4 * nchunks + 2 * total).astype(np.float32)
        chunk_of = np.repeat(np.arange(nchunks), counts)
        if (idx >= lengths[chunk_of]).any():
            raise DecodeError("a sparse tensor with an index outside its chunk")
        out = torch.zeros(n)
        out[torch.from_numpy(chunk_of * CHUNK + idx)] = torch.from_numpy(vals * scales[chunk_of])
        return out.reshape(tuple(serialized.size))

    def estimate_compression_ratio(self, info):
        return max(0.75 * self.fraction, 1 / 8)  # parts of at most 8x hivemind's fp32 part: bounded memory


def _extract_8bit(serialized, max_numel):
    """hivemind's Uniform8BitQuantization format (an int64 codebook size, the float32 codebook, a
    uint8 code per value), decoded with one table lookup: the same values as hivemind's extract(),
    which widens every code to int64 first (3x slower; the reducer decodes every member's parts)."""
    n = _numel(serialized, max_numel)
    buf = serialized.buffer
    size = int(np.frombuffer(buf, dtype="<i8", count=1)[0]) if len(buf) >= 8 else -1
    if not 0 < size <= 256 or len(buf) != 8 + 4 * size + n:
        raise DecodeError(f"an 8-bit tensor of {n} values in {len(buf)} bytes")
    codebook = np.frombuffer(buf, dtype="<f4", count=size, offset=8)
    codes = np.frombuffer(buf, dtype=np.uint8, count=n, offset=8 + 4 * size)
    return torch.from_numpy(np.take(codebook, codes)).reshape(tuple(serialized.size))


def _extract_fp16(serialized, max_numel):
    """hivemind's Float16Compression format (float16 values), widened by torch in one pass: the same
    values as hivemind's extract(), which widens them with numpy (8x slower)."""
    n = _numel(serialized, max_numel)
    if len(serialized.buffer) != 2 * n:
        raise DecodeError(f"a float16 tensor of {n} values in {len(serialized.buffer)} bytes")
    if n == 0:
        return torch.zeros(tuple(serialized.size))
    # read only: .float() copies (torch warns once that the buffer is not writable; it is never written)
    return torch.frombuffer(serialized.buffer, dtype=torch.float16).float().reshape(tuple(serialized.size))


OURS = {CODEC_4BIT: Blockwise4Bit(), CODEC_SPARSE: Sparse8Bit()}
FAST = {runtime_pb2.UNIFORM_8BIT: _extract_8bit, runtime_pb2.FLOAT16: _extract_fp16}  # float32 tensors of hivemind's codecs


def decode(serialized, max_numel):
    """A tensor from a serialized one in any codec gptswarm speaks; DecodeError (or hivemind's own
    errors) if it is malformed or has more than max_numel values."""
    codec = OURS.get(serialized.compression)
    if codec is not None:
        return codec.extract(serialized, max_numel)
    fast = FAST.get(serialized.compression)
    if fast is not None and serialized.dtype == "float32":
        return fast(serialized, max_numel)
    _numel(serialized, max_numel)
    return deserialize_torch_tensor(serialized)


def sparsify(tensor, residual, fraction):
    """Top-k with error feedback: (sent, new residual). In each CHUNK values of tensor + residual,
    the `fraction` largest in magnitude are sent (at least one per chunk); the rest is carried to the
    next round."""
    acc = tensor.reshape(-1).to(torch.float32) + (residual.reshape(-1) if residual is not None else 0)
    n = acc.numel()
    full = n // CHUNK * CHUNK
    sent = torch.zeros_like(acc)
    for start, stop in ((0, full), (full, n)):  # the whole chunks at once, then the short last one
        if stop > start:
            width = min(CHUNK, stop - start)
            blocks = acc[start:stop].view(-1, width)
            top = torch.topk(blocks.abs(), max(1, math.ceil(fraction * width)), dim=1, sorted=False).indices
            sent[start:stop].view(-1, width).scatter_(1, top, blocks.gather(1, top))
    return sent.view(tensor.shape), (acc - sent).view(tensor.shape)


class ErrorFeedback:
    """A worker's top-k state across rounds: what it has not sent yet. sparsify() proposes what to
    send; commit() keeps the new residual once the round included the contribution (a round that did
    not include it moved nothing: the old residual stands)."""

    def __init__(self, fraction):
        self.fraction = fraction
        self.residual, self.pending = {}, None

    def sparsify(self, grads):
        sent, self.pending = {}, {}
        for name, g in grads.items():
            sent[name], self.pending[name] = sparsify(g, self.residual.get(name), self.fraction)
        return sent

    def commit(self):
        if self.pending is not None:
            self.residual, self.pending = self.pending, None

    def reset(self):
        self.residual, self.pending = {}, None
