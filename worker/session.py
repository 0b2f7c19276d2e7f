"""The worker's identity in a run: joined once with the swarm token, then kept in session.json
(0600, written in one step) so that a crash, a reboot or a restart comes back as the same worker,
with the same contribution totals: with its session while it lasts, then (expired, revoked on
Leave or by a token rotation) by joining again with its worker secret and the swarm token."""

import json
import logging
from pathlib import Path

from gptswarm.private import write_private
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.worker.client import CoordinatorClient

log = logging.getLogger("gptswarm.worker")
FILE = "session.json"


def join_or_resume(client: CoordinatorClient, state_dir: Path, *, name: str, device: str,
                   peer_id: str) -> tuple[str, pb.RunConfig]:
    """(worker_id, run config) after resuming the saved session, or after joining (again); either
    way the coordinator then knows peer_id as the hivemind peer that sends our contributions."""
    saved = load(state_dir, client.address)
    client.identity = (name, device, peer_id)
    client.restore(*(saved.get(k, "") for k in ("worker_id", "secret", "session")))
    run_id = saved.get("run_id", "")
    client.on_session = lambda: save(state_dir, client, run_id)
    if client.session:
        cfg = client.run_config()  # joins again by itself if the session ended
        client.register_peer(peer_id)
        run_id = cfg.run_id
        save(state_dir, client, run_id)
        log.info("resuming as %s (%s) in run %s", client.worker_id, name, cfg.run_id)
        return client.worker_id, cfg
    client.join(name, device, peer_id)
    cfg = client.run_config()
    run_id = cfg.run_id
    save(state_dir, client, run_id)
    return client.worker_id, cfg


def load(state_dir: Path, address: str) -> dict:
    """The saved session for the coordinator at address, or {}."""
    try:
        saved = json.loads((state_dir / FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return saved if isinstance(saved, dict) and saved.get("coordinator") == address else {}


def save(state_dir: Path, client: CoordinatorClient, run_id: str) -> None:
    write_private(state_dir / FILE, json.dumps({"coordinator": client.address, "run_id": run_id,
                                               "worker_id": client.worker_id, "secret": client.secret,
                                               "session": client.session}))
