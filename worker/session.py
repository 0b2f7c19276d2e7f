"""The worker's identity in a run: joined once with the swarm token, then kept in session.json
(mode 0600) so that a crash, a reboot or a restart comes back as the same worker, with the same
contribution totals, as long as the coordinator still knows the session."""

import json
import logging
import os

from gptswarm.errors import UserError
from gptswarm.proto import gptswarm_pb2 as pb

log = logging.getLogger("gptswarm.worker")
FILE = "session.json"


def join_or_resume(client, state_dir, *, name, device, peer_id):
    """(worker_id, run config) after resuming the saved session, or after joining afresh; either
    way the coordinator then knows peer_id as the hivemind peer that sends our contributions."""
    resumed = resume(client, state_dir)
    if resumed is not None:
        worker_id, cfg = resumed
        client.call("RegisterPeer", pb.RegisterPeerRequest(peer_id=peer_id))
        log.info("resuming as %s (%s) in run %s", worker_id, name, cfg.run_id)
        return worker_id, cfg
    joined = client.join(name, device, peer_id)
    cfg = client.call("GetRunConfig", pb.RunConfigRequest())
    save(state_dir, client, joined.worker_id, cfg.run_id)
    return joined.worker_id, cfg


def resume(client, state_dir):
    """(worker_id, run config) if the session saved for this coordinator is still valid, else None."""
    try:
        saved = json.loads((state_dir / FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if saved.get("coordinator") != client.address:
        return None
    client.session = saved["session"]
    try:
        cfg = client.call("GetRunConfig", pb.RunConfigRequest())
    except UserError:  # the coordinator forgot us (new run, revoked sessions): join afresh
        client.session = ""
        return None
    if cfg.run_id != saved.get("run_id"):
        client.session = ""
        return None
    return saved["worker_id"], cfg


def save(state_dir, client, worker_id, run_id):
    path = state_dir / FILE
    path.write_text(json.dumps({"coordinator": client.address, "run_id": run_id, "worker_id": worker_id,
                                "session": client.session}))
    os.chmod(path, 0o600)
