"""Token shards: the unit of data that `gptswarm train` samples from and the coordinator leases.

A shard is a 1-D array of uint16 token ids, stored as `<sha256>.bin` (raw little-endian bytes) and
named by the sha256 of those bytes. `manifest.json` lists the shards, their split and the layout:
- "stream":   running text; a batch row is any block_size + 1 consecutive tokens of a piece of a
              shard. A training shard is made of `piece_tokens`-token pieces of the text drawn from
              all over it (a fixed shuffle), so that a worker that trains on a few leased shards still
              sees the whole corpus, as a DDP rank does; piece_tokens 0: the shard is one piece.
- "examples": fixed-length examples (e.g. a sum and its answer) back to back; the loss only
              counts targets from token `loss_start` of an example on.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gptswarm.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "gptswarm-shards/1"
PIECE_BLOCKS = 8  # default piece of a training shard, in block sizes (see "stream" above)


def read_text(path):
    """The UTF-8 text of a file, or a UserError that says what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def sha256_of(tokens):
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u2").tobytes()).hexdigest()


@dataclass
class Shard:
    tokens: np.ndarray  # (N,) uint16
    split: str  # "train" or "val"
    sha256: str = ""

    def __post_init__(self):
        self.tokens = np.ascontiguousarray(self.tokens, dtype="<u2")
        if not self.sha256:
            self.sha256 = sha256_of(self.tokens)

    def __len__(self):
        return len(self.tokens)


@dataclass
class ShardSet:
    shards: list
    vocab_size: int
    layout: str = "stream"
    example_len: int = 0  # "examples" layout only
    loss_start: int = 0  # "examples" layout only: index of the first token the loss counts
    meta: dict = field(default_factory=dict)
    piece_tokens: int = 0  # "stream" layout only: a batch row stays inside one piece of this many tokens

    def split(self, name):
        return [s for s in self.shards if s.split == name]

    def manifest(self):
        return {
            "format": FORMAT, "dtype": "uint16", "layout": self.layout, "vocab_size": self.vocab_size,
            "example_len": self.example_len, "loss_start": self.loss_start, "piece_tokens": self.piece_tokens,
            "meta": self.meta,
            "shards": [{"sha256": s.sha256, "tokens": len(s), "split": s.split} for s in self.shards],
        }

    def write(self, directory):
        """Write shards and manifest into directory (the manifest last, atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for s in self.shards:
            path = directory / f"{s.sha256}.bin"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(s.tokens.tobytes())
                os.replace(tmp, path)
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=1))
        os.replace(tmp, directory / MANIFEST)

    @classmethod
    def read(cls, directory):
        """Read a shard directory, checking every shard's sha256 against its name."""
        directory = Path(directory)
        try:
            m = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"{directory} holds no {MANIFEST}") from None
        except ValueError as e:
            raise UserError(f"{directory / MANIFEST} is not valid JSON: {e}") from None
        if m.get("format") != FORMAT:
            raise UserError(f"{directory / MANIFEST}: unknown shard format {m.get('format')!r}")
        shards = [Shard(load_shard_file(directory / f"{e['sha256']}.bin", e["sha256"]), e["split"], e["sha256"])
                  for e in m["shards"]]
        return cls(shards, m["vocab_size"], m["layout"], m["example_len"], m["loss_start"], m.get("meta", {}),
                   m.get("piece_tokens", 0))


def load_shard_file(path, expected_sha256):
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing") from None
    return decode_shard(raw, expected_sha256, str(path))


def decode_shard(raw, expected_sha256, what="shard"):
    """uint16 tokens from a shard's bytes, or a UserError if they do not hash to expected_sha256."""
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise UserError(f"{what} is corrupt: sha256 {digest[:12]}... does not match {expected_sha256[:12]}...")
    return np.frombuffer(raw, dtype="<u2").copy()


def chunk(ids, size, min_len):
    """Split ids into pieces of `size`; a last piece shorter than min_len joins the one before."""
    pieces = [ids[i:i + size] for i in range(0, len(ids), size)]
    if len(pieces) > 1 and len(pieces[-1]) < min_len:
        tail = pieces.pop()
        pieces[-1] = np.concatenate([pieces[-1], tail])
    return pieces


def pieces_of(tokens, piece_tokens, block_size):
    """A stream shard's pieces (chunk's rule: a short last piece joins the one before)."""
    return chunk(tokens, piece_tokens, block_size + 1) if piece_tokens else [tokens]


def text_shards(ids, vocab_size, block_size, shard_tokens=65536, val_fraction=0.1, piece_tokens=None, seed=0):
    """Running text -> ShardSet: the first (1 - val_fraction) of the tokens for training, the rest
    for validation (nanoGPT's split). The training text is cut into pieces of piece_tokens (default:
    PIECE_BLOCKS x block_size, at least block_size + 1; 0: no cut) that a fixed permutation (seed)
    deals into the shards; validation shards stay in order."""
    if vocab_size > 65536:
        raise UserError(f"vocab_size {vocab_size} does not fit uint16 shards")
    ids = np.asarray(ids, dtype=np.int64)
    n_val = int(len(ids) * val_fraction)
    need = block_size + 1
    if len(ids) - n_val < need or n_val < need:
        raise UserError(
            f"text too short: {len(ids)} tokens, but block_size {block_size} needs at least "
            f"{need} tokens in each of the train and validation splits")
    shard_tokens = max(shard_tokens, need)
    train = ids[:len(ids) - n_val]
    piece_tokens = PIECE_BLOCKS * block_size if piece_tokens is None else piece_tokens
    if piece_tokens:
        piece_tokens = min(max(piece_tokens, need), shard_tokens, len(train))
        n = len(train) // piece_tokens
        order = np.random.default_rng(seed).permutation(n)
        per_shard = shard_tokens // piece_tokens
        shards = [np.concatenate([train[i * piece_tokens:(i + 1) * piece_tokens] for i in order[j:j + per_shard]])
                  for j in range(0, n, per_shard)]
        rest = train[n * piece_tokens:]
        if len(rest) >= need:  # the last shard's last piece (shorter ones would join an unrelated piece)
            shards[-1] = np.concatenate([shards[-1], rest])
        shards = [Shard(p, "train") for p in shards]
    else:
        shards = [Shard(p, "train") for p in chunk(train, shard_tokens, need)]
    shards += [Shard(p, "val") for p in chunk(ids[len(ids) - n_val:], shard_tokens, need)]
    return ShardSet(shards, vocab_size, "stream", piece_tokens=piece_tokens)


class Batches:
    """Random (x, y) training batches from a list of shards, drawn with a torch.Generator so that
    a run can be resumed exactly (its state is saved in checkpoints)."""

    def __init__(self, shards, shard_set, block_size, batch_size, seed=0):
        self.layout = shard_set.layout
        self.block_size, self.batch_size = block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        if self.layout == "examples":
            L = shard_set.example_len
            self.examples = torch.from_numpy(np.concatenate([s.tokens for s in shards]).astype(np.int64)).view(-1, L)
            self.loss_start = shard_set.loss_start
        else:
            self.arrays = [p for s in shards for p in pieces_of(s.tokens, shard_set.piece_tokens, block_size)
                           if len(p) > block_size]
            if not self.arrays:
                raise UserError(f"no shard is longer than block_size {block_size}")
            starts = torch.tensor([len(a) - block_size for a in self.arrays])
            self.cum = torch.cumsum(starts, 0)

    @property
    def tokens_per_batch(self):
        return self.batch_size * (self.examples.size(1) - 1 if self.layout == "examples" else self.block_size)

    def next(self):
        if self.layout == "examples":
            rows = self.examples[torch.randint(len(self.examples), (self.batch_size,), generator=self.generator)]
            return examples_xy(rows, self.loss_start)
        g = torch.randint(int(self.cum[-1]), (self.batch_size,), generator=self.generator)
        which = torch.searchsorted(self.cum, g, right=True)
        offsets = g - torch.cat([torch.zeros(1, dtype=torch.long), self.cum])[which]
        rows = np.stack([self.arrays[w][o:o + self.block_size + 1] for w, o in zip(which.tolist(), offsets.tolist())])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def examples_xy(rows, loss_start):
    """(B, L) examples -> inputs (B, L-1) and targets (B, L-1) with the prompt part masked (-1)."""
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()
    y[:, :loss_start - 1] = -1
    return x, y


def eval_batches(shards, shard_set, block_size, batch_size, max_tokens=None):
    """Deterministic batches covering the given shards: non-overlapping windows of running text
    (the first max_tokens of them, if given), or every example once."""
    if shard_set.layout == "examples":
        rows = torch.from_numpy(np.concatenate([s.tokens for s in shards]).astype(np.int64)).view(-1, shard_set.example_len)
        for i in range(0, len(rows), batch_size):
            yield examples_xy(rows[i:i + batch_size], shard_set.loss_start)
        return
    windows = []
    for s in shards:
        t = s.tokens
        windows += [t[i:i + block_size + 1] for i in range(0, len(t) - block_size, block_size)]
    if max_tokens is not None:
        windows = windows[:max(batch_size, max_tokens // (block_size * batch_size) * batch_size)]
    for i in range(0, len(windows), batch_size):
        rows = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64))
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
