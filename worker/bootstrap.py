"""What joining a run makes, all at once (Setup): the worker joins (or resumes its session) with
its hivemind peer's id, checks what the coordinator says to train, measures its speed on it, and
builds the model, the trainer and the parts that serve the round loop. Nothing is half-made: the
round loop gets a whole Setup or an error."""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.trainer import TrainConfig, Trainer
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds.averaging import RoundContributor
from gptswarm.rounds.codecs import ErrorFeedback
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.replay import Recorder
from gptswarm.rounds.theta import theta_views
from gptswarm.worker import run_config, session, throughput
from gptswarm.worker.client import CoordinatorClient
from gptswarm.worker.exchange import Exchanger
from gptswarm.worker.heartbeat import Heartbeats
from gptswarm.worker.leases import Leases
from gptswarm.worker.pause import PausePolicy
from gptswarm.worker.state import SharedState

log = logging.getLogger("gptswarm.worker")
# (model config, train config, device, state dir) -> (tokens per second, micro-batch size)
Speed = Callable[[GPTConfig, TrainConfig, torch.device, Path], tuple[float, int]]


@dataclass(frozen=True)
class Setup:
    """The run as the coordinator describes it (its RunConfig, and what it says to train, checked),
    the model and its trainer (the round loop's alone), and the parts that serve the loop."""
    cfg: pb.RunConfig
    spec: run_config.RunSpec
    model: GPT
    trainer: Trainer
    batch_tokens: int  # tokens in one training batch
    heartbeats: Heartbeats  # not started yet
    leases: Leases
    exchanger: Exchanger
    recorder: Recorder  # our record of the round in training (rounds/replay.py), the round loop's alone


def join(client: CoordinatorClient, node: P2PNode, shared: SharedState, *, pause: PausePolicy,
         stopping: threading.Event, state_dir: Path, device: torch.device, name: str,
         sleep: Callable[[float], object], speed: Speed | None = None, max_vram: float = 0.0) -> Setup:
    """Join the run at client (connected) as `name`, with node's peer id; sleep(seconds): the
    worker's wait, which returns early when it stops; speed: what measures this machine's speed on
    the run's model (throughput.measure unless a harness gives its own)."""
    worker_id, cfg = session.join_or_resume(client, state_dir, name=name, device=throughput.describe_device(device),
                                            peer_id=str(node.peer_id))
    spec = run_config.parse(cfg, device, max_vram)  # refuses a model this machine cannot train, in one line
    model_config, train, shard_info = spec.model, spec.train, spec.shard_info
    if device.type == "cuda":  # the memory plan (mingpt_core/plan.py): micro-batch, 8-bit moments, checkpointing
        plan = spec.plan
        train.micro_batch_size, train.optimizer, train.checkpointing = (plan.micro_batch, plan.optimizer,
                                                                        plan.checkpointing)
        log.info("memory plan on %s: %s", device, plan.lines()[0])
    contributor = RoundContributor(node, theta_views(GPT(model_config)), prefix=cfg.averaging_prefix,
                                   compression=cfg.compression, topk_fraction=cfg.topk_fraction)
    feedback = ErrorFeedback(cfg.topk_fraction) if cfg.compression == "topk" else None
    batch_tokens = train.batch_size * (model_config.block_size if shard_info.layout == "stream"
                                       else shard_info.example_len - 1)
    train.max_iters = max(1, cfg.max_tokens // batch_tokens)  # the LR schedule spans the run's budget
    tps, train.micro_batch_size = (speed or throughput.measure)(model_config, train, device, state_dir)
    with shared.lock:
        shared.tokens_per_second = tps
    model = GPT(model_config)
    trainer = Trainer(model, train, device)
    heartbeats = Heartbeats(shared, client, interval=cfg.heartbeat_interval, bytes_sent=shared.sent_total)
    leases = Leases(client=client, shared=shared, pause=pause, shard_info=shard_info,
                    block_size=model.config.block_size, batch_size=trainer.cfg.batch_size, max_leases=cfg.max_leases,
                    beat=heartbeats.beat, sleep=sleep)
    recorder = Recorder(state_dir / "replay")
    exchanger = Exchanger(client=client, shared=shared, contributor=contributor, cfg=cfg, feedback=feedback,
                          stopping=stopping, records=recorder.directory)
    log.info("joined %s as %s (%s), run %s; our hivemind peer %s only dials out (nothing to open in your "
             "firewall)", client.address, worker_id, name, cfg.run_id, node.peer_id)
    return Setup(cfg, spec, model, trainer, batch_tokens, heartbeats, leases, exchanger, recorder)
