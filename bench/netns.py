"""A small private network for benchmarks: each benchmark process gets its own "host" (a network
namespace), and every host hangs off one bridge (in a hub namespace of its own) through a veth
pair. Host i has the address 10.77.0.(i+1). The bytes a host sends are read from its veth
interface counters, where they leave it; with a rate, tc tbf shapes both directions of every
host's link (e.g. "20mbit": a home uplink). Needs root (ip netns). Only these namespaces' own
addresses are ever used."""

import os
import shutil
import subprocess


def available():
    """Whether this machine lets us build the network: root, iproute2, and a kernel (or container)
    that allows namespaces, veth, a bridge and tbf. Tried once, for real."""
    global _available
    if _available is None:
        _available = False
        if os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc"):
            try:
                with Net(2, rate="100mbit", prefix="gsprobe"):
                    _available = True
            except subprocess.CalledProcessError:
                pass
    return _available


_available = None


def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True, text=True)


class Net:
    def __init__(self, hosts, rate=None, prefix="gsbench"):
        self.hub = f"{prefix}hub"
        self.ns = [f"{prefix}{i}" for i in range(hosts)]
        self.addrs = [f"10.77.0.{i + 1}" for i in range(hosts)]
        self.dev = "eth0"  # each host's end of its link
        self.rate = rate

    def __enter__(self):
        self._delete()  # a leftover of a killed run
        try:
            self._build()
        except BaseException:
            self._delete()
            raise
        return self

    def _build(self):
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.ns, self.addrs)):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            port = f"port{i}"
            sh("ip", "link", "add", self.dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.hub)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.dev)
            sh("ip", "-n", ns, "link", "set", self.dev, "up")
            sh("ip", "-n", self.hub, "link", "set", port, "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", port, "up")
            if self.rate:  # egress of both ends: the host's uplink and its downlink
                for where, dev in ((ns, self.dev), (self.hub, port)):
                    sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                       self.rate, "burst", "32kb", "latency", "100ms")

    def __exit__(self, *exc):
        self._delete()

    def _delete(self):
        for ns in (*self.ns, self.hub):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exec(self, i, argv):
        return ["ip", "netns", "exec", self.ns[i], *argv]

    def tx_bytes(self, i):
        out = subprocess.run(self.exec(i, ["cat", f"/sys/class/net/{self.dev}/statistics/tx_bytes"]),
                             check=True, capture_output=True, text=True).stdout
        return int(out)
