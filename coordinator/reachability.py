"""Can a stranger dial this peer? A fresh hivemind peer, with no connection to the target yet,
tries (Petals' check: a worker behind NAT is not reachable, and should stay in client mode)."""

import asyncio

import gptswarm.rounds.hivemind_ext  # noqa: F401  (first: it checks the installed hivemind's version)
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr


def is_reachable(peer_id, addrs, timeout=5.0):
    """(reachable, detail) for peer_id at one of addrs (multiaddr strings)."""
    try:
        target = PeerID.from_base58(peer_id)
        maddrs = [Multiaddr(a) for a in addrs]
    except Exception:
        return False, "invalid peer id or address"
    if not maddrs:
        return False, "invalid peer id or address: give the peer's address as ?addr=/ip4/HOST/tcp/PORT"
    return asyncio.run(_probe(target, maddrs, timeout))


async def _probe(target, maddrs, timeout):
    p2p = await P2P.create()
    try:
        await asyncio.wait_for(p2p._client.connect(target, maddrs), timeout)
        return True, "connected"
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e)[:200] or 'no answer'}"
    finally:
        await p2p.shutdown()
