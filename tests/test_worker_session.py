"""A worker whose session ends (it expired while the laptop slept, the operator revoked it) joins
again, with its secret, as the same worker; it never retries the ended session. Against a real
coordinator process, including the case where the session ends between the join and a streamed
download (the stream's error arrives only as it is read)."""

import random
import sqlite3

import grpc
import pytest
import torch

from fuzz_api import random_peer_id
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.worker import download, run_config, session
from gptswarm.worker.client import CoordinatorClient
from swarm import coordinator, join_address


def revoke(state_dir, worker_id):
    """What the expiry sweep or a token rotation does to a session: the ledger forgets it."""
    db = sqlite3.connect(state_dir / "ledger.sqlite", timeout=30)
    with db:
        db.execute("UPDATE workers SET session_hash = NULL WHERE id = ?", (worker_id,))
    db.close()


def test_a_session_that_ends_before_a_download_leads_to_a_fresh_join(tmp_path):
    sd = tmp_path / "coord"
    coord = coordinator(sd)
    try:
        join = join_address(coord)
        client = CoordinatorClient(join, "sekrit", pin=join.pin, plaintext=not join.pin)
        client.connect()
        (tmp_path / "w").mkdir()
        worker_id, cfg = session.join_or_resume(client, tmp_path / "w", name="w", device="cpu",
                                                peer_id=random_peer_id(random.Random(1)))
        spec = run_config.parse(cfg, torch.device("cpu"))
        revoke(sd, worker_id)
        ended = client.session
        with pytest.raises(grpc.RpcError) as e:
            download.theta(client, spec)  # the stream's UNAUTHENTICATED comes while it is read
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not client.rejoin_if_ended(grpc.RpcError(), ended)  # other errors are not a session's end
        assert client.rejoin_if_ended(e.value, ended)
        assert client.session != ended and client.worker_id == worker_id  # the same worker, a new session
        theta, _, round_, _, digest = download.theta(client, spec)
        assert theta and round_ == 0 and digest
        # the other thread that finds out with the same ended session joins no second time
        again = client.session
        assert client.rejoin_if_ended(e.value, ended) and client.session == again
        # a unary call does the same by itself
        revoke(sd, worker_id)
        assert client.call("GetRunConfig", pb.RunConfigRequest()).run_id == cfg.run_id
        assert client.session != again
    finally:
        coord.kill()
