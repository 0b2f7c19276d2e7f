"""What the worker downloads from the coordinator: leased shards (checked against the sha256 they
were leased with) and theta_global (checked against the coordinator's theta hash)."""

import math
import tempfile
from pathlib import Path

from gptswarm.errors import UserError
from gptswarm.mingpt_core.data import Batches, Shard, decode_shard
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds.theta import load_theta, theta_hash, theta_views
from gptswarm.worker.state import LeasedShard

SHARD_TIMEOUT = 120.0
CHECKPOINT_TIMEOUT = 600.0


def shard(client, lease, shard_info, *, block_size, batch_size):
    """The LeasedShard for a granted LeaseResponse; UserError if its bytes do not match."""
    chunks = client.call("GetShard", pb.ShardRequest(shard_index=lease.shard_index), timeout=SHARD_TIMEOUT,
                         stream=True)
    tokens = decode_shard(b"".join(c.data for c in chunks), lease.sha256, f"shard {lease.shard_index}")
    batches = Batches([Shard(tokens, "train", lease.sha256)], shard_info, block_size, batch_size,
                      seed=int(lease.sha256[:8], 16) ^ lease.epoch)
    return LeasedShard(lease.lease_id, lease.tokens, batches,
                       steps_needed=max(1, math.ceil(lease.tokens / batches.tokens_per_batch)))


def theta(client):
    """(theta, momentum, round, meta, theta hash) of the coordinator's latest checkpoint; UserError if
    it does not hash to the coordinator's theta hash."""
    chunks = client.call("GetCheckpoint", pb.CheckpointRequest(), timeout=CHECKPOINT_TIMEOUT, stream=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for c in chunks:
            files.setdefault(c.file, []).append(c.data)
        for name, parts in files.items():
            (Path(tmp) / Path(name).name).write_bytes(b"".join(parts))
        model, _, meta, momentum = load_theta(tmp)
    theta = {k: v.clone() for k, v in theta_views(model).items()}
    digest = theta_hash(theta)
    if digest != chunks[0].theta_hash:
        raise UserError("downloaded checkpoint does not match the coordinator's theta hash")
    return theta, momentum, chunks[0].round, meta, digest
