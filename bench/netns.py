"""Two network namespaces joined by a veth pair (10.77.0.1 <-> 10.77.0.2), optionally shaped with
tc tbf: each benchmark process gets its own "host", and the bytes it sends are read from its veth
interface counters, where they leave it. Needs root (ip netns). Only these namespaces' own
addresses are ever used."""

import subprocess

ADDRS = ("10.77.0.1", "10.77.0.2")


def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True, text=True)


class Link:
    def __init__(self, prefix="gsbench", rate=None):
        self.ns = (f"{prefix}0", f"{prefix}1")
        self.ifs = ("veth0", "veth1")
        self.rate = rate  # e.g. "20mbit": tc tbf on both ends

    def __enter__(self):
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover of a killed run
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.ifs[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.ifs[1],
           "netns", self.ns[1])
        for ns, dev, addr in zip(self.ns, self.ifs, ADDRS):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            if self.rate:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                   "burst", "64kb", "latency", "50ms")
        return self

    def __exit__(self, *exc):
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exec(self, i, argv):
        return ["ip", "netns", "exec", self.ns[i], *argv]

    def tx_bytes(self, i):
        out = subprocess.run(self.exec(i, ["cat", f"/sys/class/net/{self.ifs[i]}/statistics/tx_bytes"]),
                             check=True, capture_output=True, text=True).stdout
        return int(out)
