"""Advice for a worker that accepts hivemind connections (--p2p-listen): can the coordinator dial
it, and if not, what to open."""

import logging

from gptswarm.proto import gptswarm_pb2 as pb

log = logging.getLogger("gptswarm.worker")


def advise(client, dht, client_mode):
    if client_mode:
        log.info("client mode: nothing to open in your firewall; your averaging goes through the coordinator")
        return
    addrs = [str(m).split("/p2p/")[0] for m in dht.get_visible_maddrs()]
    r = client.call("CheckReachability", pb.ReachabilityRequest(peer_id=dht.peer_id.to_base58(), addrs=addrs))
    if r.reachable:
        log.info("reachable: the coordinator can connect to %s", ", ".join(addrs))
    else:
        port = addrs[0].rsplit("/", 1)[-1] if addrs else "?"
        log.warning("the coordinator cannot reach %s (%s): open TCP port %s in your firewall and forward it "
                    "on your router (and pass --announce-host YOUR_PUBLIC_IP), or drop --p2p-listen to run in "
                    "client mode", ", ".join(addrs), r.detail, port)
