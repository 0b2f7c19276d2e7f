"""theta_global from the coordinator's latest checkpoint, and from there into the model: downloaded
again while a round commits mid-download or the coordinator is busy, after joining again (never
with the ended session) if ours ended."""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.model import GPT
from gptswarm.rounds.theta import theta_hash
from gptswarm.worker import download
from gptswarm.worker.client import CoordinatorClient
from gptswarm.worker.run_config import RunSpec

log = logging.getLogger("gptswarm.worker")
TRIES = 8


@dataclass
class OuterState:
    """theta_global and the outer momentum, fp32 on the CPU. One thread owns them at a time: the
    round loop, or the exchange it hands them to, which gives them back through its Task."""
    theta: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]

    def copy(self) -> "OuterState":
        return OuterState({k: v.clone() for k, v in self.theta.items()},
                          {k: v.clone() for k, v in self.momentum.items()})

    def hash(self) -> str:
        return theta_hash(self.theta)


@dataclass(frozen=True)
class Checkpoint:
    """The coordinator's latest checkpoint, as downloaded."""
    outer: OuterState
    round: int
    tokens_trained: int  # the swarm's, at that round
    digest: str  # theta_global's hash


def from_checkpoint(client: CoordinatorClient, spec: RunSpec, *, sleep: Callable[[float], object],
                    tries: int = TRIES) -> Checkpoint:
    """Download the latest checkpoint; UserError after `tries` failed downloads. sleep(seconds)
    waits between them (and returns early when the worker stops)."""
    attempt = 0
    while True:
        session = client.session
        try:
            theta, momentum, round_, meta, digest = download.theta(client, spec)
            return Checkpoint(OuterState(theta, momentum), round_, int(meta.get("tokens_trained", 0)), digest)
        except (UserError, grpc.RpcError) as e:  # a round committed mid-download, the coordinator busy
            attempt += 1
            if attempt == tries:
                raise UserError(f"cannot download theta_global: {download.why(e)}") from None
            if client.rejoin_if_ended(e, session):  # a new session, not another try of the old one
                log.warning("%s; joined again, downloading again", download.why(e))
                continue
            log.warning("%s; downloading again", download.why(e))
            sleep(min(2 ** (attempt - 1), 30))


def into_model(model: GPT, theta: dict[str, torch.Tensor], carry_from: dict[str, torch.Tensor] | None = None) -> None:
    """theta_local = theta_global; or, with carry_from (theta_local when we sent our pseudo-
    gradient), theta_local += theta_global - carry_from: the steps trained since are kept."""
    with torch.no_grad():
        params = model.state_dict()
        for k, v in theta.items():
            if carry_from is None:
                params[k].copy_(v)
            else:
                params[k].add_((v - carry_from[k]).to(params[k].device, params[k].dtype))
