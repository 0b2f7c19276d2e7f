"""A hivemind peer (its libp2p daemon, p2pd) owned by this process, with an asyncio event loop of its
own in a background thread. The coordinator's listens and keeps its identity across restarts;
a worker's only dials out (to the coordinator), so it has nothing to open in a firewall and nobody
else can reach it. libp2p's handshake proves each side's peer id: that is what the coordinator
checks a worker's averaging traffic against."""

import asyncio
import threading
from pathlib import Path

import gptswarm.rounds.hivemind_ext  # noqa: F401  (first: it checks the installed hivemind's version)
from gptswarm.errors import UserError
from gptswarm.private import write_private
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

STARTUP_TIMEOUT = 30.0


def new_identity():
    """A new hivemind peer identity: a serialized libp2p RSA private key (what hivemind itself writes)."""
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes()).SerializeToString()


class P2PNode:
    """listen: HOST:PORT to accept connections on, or None to only dial out; announce_host: the
    public host other peers should dial; identity_path: keeps the peer id across restarts."""

    def __init__(self, *, listen=None, announce_host=None, identity_path=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="p2p", daemon=True)
        self.thread.start()
        if identity_path and not Path(identity_path).exists():
            write_private(identity_path, new_identity())  # hivemind would write it world-readable, then chmod
        kwargs = {"identity_path": str(identity_path)} if identity_path else {}
        if listen:
            host, _, port = listen.rpartition(":")
            kwargs["host_maddrs"] = [f"/ip4/{host or '0.0.0.0'}/tcp/{port or 0}"]
            if announce_host:
                kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
        else:
            kwargs.update(host_maddrs=[], no_listen=True)
        try:
            self.p2p = self.run(P2P.create(dht_mode="client", auto_nat=False, nat_port_map=False, use_relay=False,
                                           startup_timeout=STARTUP_TIMEOUT, **kwargs))
        except Exception as e:
            self._stop_loop()
            raise UserError(f"cannot start the hivemind peer on {listen or 'an outgoing-only address'}: "
                            f"{str(e).splitlines()[0][:200]}") from None
        self.peer_id = self.p2p.peer_id

    def run(self, coro, timeout=None):
        """Run a coroutine on this node's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def maddrs(self):
        """The multiaddrs other peers can dial this node at (empty for an outgoing-only node)."""
        return [str(m) for m in self.run(self.p2p.get_visible_maddrs())]

    def connect(self, peer_id, maddrs, timeout=10.0):
        """Dial peer_id (a base58 string) at one of maddrs; raises on failure."""
        target = PeerID.from_base58(peer_id)
        addrs = [Multiaddr(a.split("/p2p/")[0]) for a in maddrs]  # the daemon wants them without the peer id
        self.run(asyncio.wait_for(self.p2p._client.connect(target, addrs), timeout))

    def shutdown(self):
        try:
            self.run(self.p2p.shutdown(), timeout=10)
        finally:
            self._stop_loop()

    def _stop_loop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
