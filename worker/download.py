"""What the worker downloads from the coordinator, streamed and bounded: a leased shard (no more
bytes than its lease's tokens, checked against the sha256 it was leased with) and theta_global
(only the checkpoint format's own files, each within the size the run's model implies and the
size the coordinator declared, written to disk as it arrives, checked against the coordinator's
theta hash)."""

import math
import tempfile
from pathlib import Path
from typing import IO

import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.data import Batches, Shard, ShardSet, decode_shard
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds.theta import load_theta, theta_hash, theta_views
from gptswarm.worker.client import CoordinatorClient
from gptswarm.worker.run_config import RunSpec
from gptswarm.worker.state import LeasedShard

SHARD_TIMEOUT = 120.0
CHECKPOINT_TIMEOUT = 600.0
TOKEN_BYTES = 2  # shards hold uint16 tokens


def shard(client: CoordinatorClient, lease: pb.LeaseResponse, shard_info: ShardSet, *, block_size: int,
          batch_size: int) -> LeasedShard:
    """The LeasedShard for a granted LeaseResponse; UserError if its bytes do not match."""
    limit = TOKEN_BYTES * (lease.tokens + 1)
    raw = bytearray()
    for c in client.shard(lease.lease_id, timeout=SHARD_TIMEOUT):
        raw += c.data
        if len(raw) > limit:
            raise UserError(f"shard {lease.shard_index} is larger than its lease's {lease.tokens} tokens")
    tokens = decode_shard(bytes(raw), lease.sha256, f"shard {lease.shard_index}")
    batches = Batches([Shard(tokens, "train", lease.sha256)], shard_info, block_size, batch_size,
                      seed=int(lease.sha256[:8], 16) ^ lease.epoch)
    return LeasedShard(lease.lease_id, lease.tokens, batches,
                       steps_needed=max(1, math.ceil(lease.tokens / batches.tokens_per_batch)))


def theta(client: CoordinatorClient,
          spec: RunSpec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, dict, str]:
    """(theta, momentum, round, meta, theta hash) of the coordinator's latest checkpoint; UserError
    if a file is not the format's, is larger than spec (run_config.RunSpec) allows or than declared,
    or the whole does not hash to the coordinator's theta hash."""
    chunks = client.checkpoint(timeout=CHECKPOINT_TIMEOUT)
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, IO[bytes]] = {}
        sizes: dict[str, list[int]] = {}
        first: pb.CheckpointChunk | None = None
        try:
            for c in chunks:
                first = first or c
                if c.file not in files:
                    limit = spec.file_limit(c.file)
                    if limit is None or c.file in sizes:
                        raise UserError(f"the coordinator's checkpoint has an unexpected file {c.file[:80]!r}")
                    if c.size > limit:
                        raise UserError(f"the coordinator's checkpoint file {c.file} declares {c.size:,} bytes, "
                                        f"more than the run's model allows ({limit:,})")
                    for f in files.values():
                        f.close()
                    files = {c.file: open(Path(tmp) / c.file, "wb")}  # noqa: SIM115 (closed in the finally)
                    sizes[c.file] = [c.size, 0]
                sizes[c.file][1] += len(c.data)
                if sizes[c.file][1] > sizes[c.file][0]:
                    raise UserError(f"the coordinator's checkpoint file {c.file} is longer than declared")
                files[c.file].write(c.data)
        finally:
            for f in files.values():
                f.close()
        short = [name for name, (declared, got) in sizes.items() if got != declared]
        if first is None or short:
            raise UserError(f"the coordinator's checkpoint is incomplete ({', '.join(short) or 'empty'})")
        model, _, meta, momentum = load_theta(tmp)
    theta = {k: v.clone() for k, v in theta_views(model).items()}
    digest = theta_hash(theta)
    if digest != first.theta_hash:
        raise UserError("downloaded checkpoint does not match the coordinator's theta hash")
    return theta, momentum, first.round, meta, digest


def why(error: BaseException) -> str:
    """One line for a failed download."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):  # a grpc.RpcError
        return f"{code().name}: {details()}"
    return str(error)
