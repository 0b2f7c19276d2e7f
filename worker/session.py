"""The worker's identity in a run: joined once with the swarm token, then kept in session.json
(0600, written in one step) so that a crash, a reboot or a restart comes back as the same worker,
with the same contribution totals: with its session while it lasts, then (expired, revoked on
Leave or by a token rotation) by joining again with its worker secret and the swarm token."""

import json
import logging

from gptswarm.private import write_private
from gptswarm.proto import gptswarm_pb2 as pb

log = logging.getLogger("gptswarm.worker")
FILE = "session.json"


def join_or_resume(client, state_dir, *, name, device, peer_id):
    """(worker_id, run config) after resuming the saved session, or after joining (again); either
    way the coordinator then knows peer_id as the hivemind peer that sends our contributions."""
    saved = load(state_dir, client.address)
    client.identity = (name, device, peer_id)
    client.worker_id, client.secret, client.session = (saved.get(k, "") for k in ("worker_id", "secret", "session"))
    run_id = saved.get("run_id", "")
    client.on_session = lambda: save(state_dir, client, run_id)
    if client.session:
        cfg = client.call("GetRunConfig", pb.RunConfigRequest())  # joins again by itself if the session ended
        client.call("RegisterPeer", pb.RegisterPeerRequest(peer_id=peer_id))
        run_id = cfg.run_id
        save(state_dir, client, run_id)
        log.info("resuming as %s (%s) in run %s", client.worker_id, name, cfg.run_id)
        return client.worker_id, cfg
    client.join(name, device, peer_id)
    cfg = client.call("GetRunConfig", pb.RunConfigRequest())
    run_id = cfg.run_id
    save(state_dir, client, run_id)
    return client.worker_id, cfg


def load(state_dir, address):
    """The saved session for the coordinator at address, or {}."""
    try:
        saved = json.loads((state_dir / FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return saved if isinstance(saved, dict) and saved.get("coordinator") == address else {}


def save(state_dir, client, run_id):
    write_private(state_dir / FILE, json.dumps({"coordinator": client.address, "run_id": run_id,
                                               "worker_id": client.worker_id, "secret": client.secret,
                                               "session": client.session}))
