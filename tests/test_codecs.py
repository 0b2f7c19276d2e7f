"""gptswarm's own pseudo-gradient codecs (4-bit, sparse top-k): their round trips, the error
feedback's bookkeeping, and a receiver's defence against malformed or oversized claims (also
through a real hivemind all-reduce, from a sender whose codec lies)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptswarm.rounds.averaging import Group, RoundContributor, RoundReducer
from gptswarm.rounds.codecs import CHUNK, Blockwise4Bit, DecodeError, ErrorFeedback, Sparse8Bit, decode, sparsify
from gptswarm.rounds.p2p import P2PNode


@pytest.mark.parametrize("n", [1, 63, 64, 4097, 100_000])
def test_4bit_round_trip(n):
    t = torch.randn(n) * 0.01
    s = Blockwise4Bit().compress(t)
    assert len(s.buffer) == -(-n // 64) * 34  # a bfloat16 scale and 32 bytes of codes per 64 values
    back = decode(s, n)
    assert back.shape == t.shape
    assert (back - t).norm() <= 0.15 * t.norm()  # 15 levels per block
    assert torch.equal(decode(Blockwise4Bit().compress(back), n), back)  # decoding is a fixed point


@pytest.mark.parametrize("scale", [1e-9, 1e-6, 1e-3, 10.0])
def test_small_pseudo_gradients_survive_both_codecs(scale):
    """A round of one or two steps early in the warmup moves theta by 1e-5 or less: a float16 scale
    decoded that as zeros (and honest members then looked like copies of each other)."""
    t = torch.randn(10_000) * scale
    back = decode(Blockwise4Bit().compress(t), t.numel())
    assert (back - t).norm() <= 0.15 * t.norm()
    sent, _ = sparsify(t, None, 0.03)
    back = decode(Sparse8Bit().compress(sent), t.numel())
    assert torch.equal(back != 0, sent != 0) and (back - sent).norm() <= 0.01 * sent.norm()


@pytest.mark.parametrize("n", [5, 4096, 10_000])
def test_top_k_with_error_feedback_sends_everything_eventually(n):
    g = torch.randn(n)
    sent, residual = sparsify(g, None, 0.03)
    assert torch.equal(sent + residual, g)  # nothing lost: what is not sent is carried
    chunks = [sent[i:i + CHUNK] for i in range(0, n, CHUNK)]
    assert all(int(torch.count_nonzero(c)) == max(1, -(-len(c) * 3 // 100)) for c in chunks)
    for i in range(0, n, CHUNK):  # the largest ones of each chunk
        c, kept = g[i:i + CHUNK], sent[i:i + CHUNK] != 0
        assert kept.all() or c[kept].abs().min() >= c[~kept].abs().max()
    # over rounds of zero new signal, the residual drains: every value gets sent
    ef, total = ErrorFeedback(0.03), torch.zeros(n)
    for _ in range(40):
        out = ef.sparsify({"g": g if not total.any() else torch.zeros(n)})["g"]
        ef.commit()
        total += out
    assert torch.allclose(total, g)
    # a round that did not include the contribution keeps the old residual
    ef = ErrorFeedback(0.03)
    ef.sparsify({"g": g})
    assert ef.residual == {}  # not committed


def test_sparse_round_trip_and_dense_fallback():
    sent, _ = sparsify(torch.randn(50_000), None, 0.03)
    s = Sparse8Bit().compress(sent)
    assert len(s.buffer) <= 50_000 * 0.03 * 3 + 4 * 13 + 64
    back = decode(s, 50_000)
    assert torch.equal(back != 0, sent != 0) and (back - sent).norm() < 0.01 * sent.norm()
    dense = torch.randn(50_000)  # an average of many supports: 8-bit is smaller, and is chosen
    s = Sparse8Bit(dense_fallback=True).compress(dense)
    assert len(s.buffer) < 50_000 * 1.1 and (decode(s, 50_000) - dense).norm() < 0.05 * dense.norm()


def test_decode_refuses_malformed_and_oversized_claims():
    sent, _ = sparsify(torch.randn(8192), None, 0.03)
    s = Sparse8Bit().compress(sent)
    with pytest.raises(DecodeError, match="at most 4096"):
        decode(s, 4096)  # more values than the receiver's part: refused before anything is built
    huge = Sparse8Bit().compress(sent)
    del huge.size[:]
    huge.size.extend([1 << 31, 1 << 9])  # a terabyte of zeros, claimed in a few bytes
    with pytest.raises(DecodeError):
        decode(huge, 1 << 20)
    for cut in (1, 5, len(s.buffer) // 2):
        bad = Sparse8Bit().compress(sent)
        bad.buffer = s.buffer[:-cut]
        with pytest.raises(DecodeError):
            decode(bad, 8192)
    bad = Sparse8Bit().compress(sent)
    buf = bytearray(bad.buffer)
    buf[0:2] = (5000).to_bytes(2, "little")  # a chunk that claims more values than it holds
    bad.buffer = bytes(buf)
    with pytest.raises(DecodeError):
        decode(bad, 8192)
    four = Blockwise4Bit().compress(torch.randn(1000))
    four.buffer = four.buffer + b"x"
    with pytest.raises(DecodeError):
        decode(four, 1000)


class LyingSparse(Sparse8Bit):
    """A hostile sender's codec: its parts claim a thousand times their size."""

    def compress(self, tensor, info=None, allow_inplace=False):
        s = super().compress(tensor, info, allow_inplace)
        del s.size[:]
        s.size.extend([tensor.numel() * 1000])
        return s


def test_reducer_excludes_senders_whose_parts_do_not_decode_or_are_too_dense():
    """Through a real all-reduce: a member whose parts claim more values than the part holds, and
    in a top-k run a member that sends more than the run's fraction of nonzeros (to hog the
    coordinator's link, or to push more of its own direction), are left out and told why; the
    honest member's round completes."""
    template = {"w": torch.zeros(20_000)}
    coord, nodes = P2PNode(listen="127.0.0.1:0"), [P2PNode(), P2PNode(), P2PNode()]
    try:
        reducer = RoundReducer(coord, template, prefix="codec", compression="topk", aggregation="mean",
                               sender_timeout=3.0, on_refused=lambda *a: None)
        honest, liar, hog = (RoundContributor(n, template, prefix="codec", compression="topk") for n in nodes)
        liar.codecs = (LyingSparse(0.03), liar.codecs[1])
        group = Group(0, {str(c.node.peer_id): (name, 4) for c, name in ((honest, "honest"), (liar, "liar"),
                                                                          (hog, "hog"))})
        g = ErrorFeedback(0.03).sparsify({"w": torch.randn(20_000)})
        sent = {honest: g, liar: g, hog: {"w": torch.randn(20_000)}}  # the hog: every value
        with ThreadPoolExecutor(4) as ex:
            red = ex.submit(reducer.reduce, group, 30)
            outs = [ex.submit(c.contribute, sent[c], group_id=group.group_id, reducers=[(str(coord.peer_id), coord.maddrs())],
                              reducer_nodes=False, weight=4, timeout=30) for c in (honest, liar, hog)]
            red, (good, bad, greedy) = red.result(), [f.result() for f in outs]
        assert red.ok and good.ok and not bad.ok and not greedy.ok, (red.error, bad.error, greedy.error)
        assert red.included == {"honest": 4}, red.rejected
        assert "malformed part" in red.rejected["liar"]
        assert "denser than the run's top-k" in red.rejected["hog"]
        assert torch.equal(red.averaged["w"], good.averaged["w"])
        assert (red.averaged["w"] - g["w"]).norm() < 0.02 * g["w"].norm()  # the honest member's alone
    finally:
        for n in (coord, *nodes):
            n.shutdown()


def test_density_rule_accepts_honest_parts_cut_anywhere():
    """hivemind cuts a tensor into parts that need not line up with the 4096-value chunks (fractions
    above 1/6): an honest top-k contribution is accepted in any cut, a denser one is not."""
    import asyncio

    from gptswarm.rounds.hivemind_ext import ValidatingReducer

    async def check():
        g = torch.randn(5 * CHUNK)
        cut = 2048 + 7  # through the middle of the first chunk, whose largest values all lie before the cut
        g[:cut] = 100 + torch.rand(cut)
        sent, _ = sparsify(g, None, 0.5)
        assert int(torch.count_nonzero(sent[:cut])) == CHUNK // 2
        parts = [sent[:cut], sent[cut:]]
        reducer = ValidatingReducer([p.shape for p in parts], 1, ["w"], [], max_density=0.5)
        assert [reducer.reason_to_reject(i, p, 1.0) for i, p in enumerate(parts)] == [None, None]
        dense = torch.randn(parts[1].shape)
        assert "denser than the run's top-k" in reducer.reason_to_reject(1, dense, 1.0)

    asyncio.run(check())


@pytest.mark.parametrize("codec", ["fp16", "8bit"])
@pytest.mark.parametrize("shape", [(1,), (77,), (300, 100), (1 << 19,)])
def test_the_reducers_decoders_give_hiveminds_values(codec, shape):
    """decode() reads hivemind's float16 and 8-bit formats with its own one-pass decoders (the
    reducer decodes every member's parts): the very values hivemind's extract() gives."""
    from hivemind.compression import CompressionInfo, Float16Compression, Uniform8BitQuantization, \
        deserialize_torch_tensor
    compressor = {"fp16": Float16Compression, "8bit": Uniform8BitQuantization}[codec]()
    x = torch.randn(shape) * 0.01
    serialized = compressor.compress(x, CompressionInfo.from_tensor(x))
    ours, theirs = decode(serialized, x.numel()), deserialize_torch_tensor(serialized)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)
    with pytest.raises(DecodeError):
        decode(serialized, x.numel() - 1)  # more values than the receiver expects
    serialized.buffer = serialized.buffer[:-1]
    with pytest.raises(DecodeError):
        decode(serialized, x.numel())
