import numpy as np
import pytest
import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.addition import AdditionTask
from gptswarm.mingpt_core.data import (Batches, ShardSet, eval_batches, pieces_of, read_text, sha256_of,
                                       text_shards)
from gptswarm.mingpt_core.tokenizer import Tokenizer

UNICODE = "Ünïcödé — naïve café, 東京, emoji 🙂\nsecond line\ttab"


def test_char_tokenizer_round_trip_and_save(tmp_path, small_text):
    text = small_text.read_text()
    tok = Tokenizer.train_char(text)
    assert tok.kind == "char" and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) == len(text)
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.kind == "char" and again.encode(text) == ids
    assert again.backend.decode(ids[:100]) == text[:100]  # the saved file decodes on its own too


def test_char_tokenizer_rejects_unknown_characters():
    tok = Tokenizer.train_char("abc")
    with pytest.raises(UserError, match=r"character 'z' \(U\+007A\) is not in the tokenizer's vocabulary"):
        tok.encode("abz")


def test_bpe_round_trip_any_text(tmp_path, small_text):
    text = small_text.read_text()
    tok = Tokenizer.train_bpe(text, 512)
    assert tok.kind == "bpe" and tok.vocab_size == 512
    ids = tok.encode(text[:5000])
    assert tok.decode(ids) == text[:5000]
    assert len(ids) < 5000 * 0.6  # merges were learned
    assert tok.decode(tok.encode(UNICODE)) == UNICODE  # byte-level: nothing is out of vocabulary
    tok.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").encode(UNICODE) == tok.encode(UNICODE)


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "t.json")


def test_read_text_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(UserError, match="no such file"):
        read_text(tmp_path / "missing.txt")


def test_text_shards_split_and_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 300, 10_000)
    s = text_shards(ids, 300, block_size=32, shard_tokens=1000, piece_tokens=0)
    train, val = s.split("train"), s.split("val")
    assert sum(map(len, train)) == 9000 and sum(map(len, val)) == 1000
    assert np.array_equal(np.concatenate([x.tokens for x in train + val]), ids)  # nothing lost, order kept
    assert all(sh.sha256 == sha256_of(sh.tokens) for sh in s.shards)
    s.write(tmp_path / "shards")
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == sorted([f"{sh.sha256}.bin" for sh in s.shards] + ["manifest.json"])
    back = ShardSet.read(tmp_path / "shards")
    assert [x.sha256 for x in back.shards] == [x.sha256 for x in s.shards]
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(back.shards, s.shards))


def test_short_tail_joins_previous_shard():
    s = text_shards(np.arange(2030) % 7, 7, block_size=16, shard_tokens=1000, val_fraction=0.01, piece_tokens=0)
    assert [len(x) for x in s.split("train")] == [1000, 1010]


def test_training_shards_deal_pieces_from_the_whole_text(tmp_path):
    ids = np.arange(60_000)  # a token's value is its position: pieces show where they came from
    s = text_shards(ids, 65536, block_size=64, shard_tokens=4096)
    assert s.piece_tokens == 8 * 64
    train = s.split("train")
    assert sum(map(len, train)) == 54_000  # nothing lost: 105 pieces, and the 240 tokens after them
    assert [len(x) for x in train[:-1]] == [4096] * (len(train) - 1)
    starts = []
    for sh in train:
        for piece in pieces_of(sh.tokens.astype(np.int64), s.piece_tokens, 64):
            assert np.all(np.diff(piece) == 1)  # each piece is running text
            starts.append(int(piece[0]))
    assert sorted(starts) == [i * 512 for i in range(106)]  # every piece once
    first = [int(p[0]) for p in pieces_of(train[0].tokens.astype(np.int64), 512, 64)]
    assert max(first) - min(first) > 27_000  # one shard holds text from far apart
    assert np.array_equal(s.split("val")[0].tokens, ids[54_000:58_096])  # validation stays in order
    s.write(tmp_path)
    assert ShardSet.read(tmp_path).piece_tokens == 512
    # a worker's batches from one shard never cross from one piece into another
    b = Batches(train[:1], s, block_size=64, batch_size=256, seed=0)
    for _ in range(20):
        x, y = b.next()
        assert torch.equal(y - x, torch.ones_like(x))


def test_corrupt_shard_is_detected(tmp_path):
    s = text_shards(np.arange(5000) % 50, 50, block_size=8, shard_tokens=1000)
    s.write(tmp_path)
    victim = tmp_path / f"{s.shards[1].sha256}.bin"
    raw = bytearray(victim.read_bytes())
    raw[10] ^= 1
    victim.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="is corrupt: sha256"):
        ShardSet.read(tmp_path)
    victim.unlink()
    with pytest.raises(UserError, match="is missing"):
        ShardSet.read(tmp_path)


def test_text_too_short_for_block_size():
    with pytest.raises(UserError, match="text too short"):
        text_shards(np.arange(100), 100, block_size=64)


def test_batches_are_windows_of_the_shards():
    ids = np.arange(5000) % 1000
    s = text_shards(ids, 1000, block_size=8, shard_tokens=1000)
    b = Batches(s.split("train"), s, block_size=8, batch_size=32, seed=0)
    x, y = b.next()
    assert x.shape == y.shape == (32, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal((x[:, 1:] - x[:, :-1]) % 1000, torch.ones(32, 7, dtype=torch.long))
    rows = list(eval_batches(s.split("val"), s, 8, 1000))
    assert sum(len(r[0]) for r in rows) == (500 - 1) // 8


def test_addition_examples_and_loss_mask():
    task = AdditionTask(2)
    rows = task.encode(np.array([85 * 100 + 50, 7 * 100 + 3]))
    assert rows.tolist() == [[8, 5, 5, 0, 5, 3, 1], [0, 7, 0, 3, 0, 1, 0]]  # 85+50=135 -> "531"; 07+03=010 -> "010"
    s = task.shard_set(shard_tokens=700)
    assert s.layout == "examples" and s.example_len == 7 and s.loss_start == 4
    train, val = task.problems()
    assert len(val) == 1000 and len(train) == 9000 and not set(train) & set(val)
    assert sum(len(x) for x in s.split("val")) == 7000
    x, y = Batches(s.split("train"), s, 6, 16).next()
    assert x.shape == (16, 6) and (y[:, :3] == -1).all() and (y[:, 3:] >= 0).all()


def test_addition_rejects_small_block_and_bad_digits():
    with pytest.raises(UserError, match="block_size 5 is too small for 2-digit addition, which needs 6"):
        AdditionTask(2).check_block_size(5)
    with pytest.raises(UserError, match="between 1 and"):
        AdditionTask(9)
