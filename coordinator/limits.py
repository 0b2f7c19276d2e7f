"""What keeps one stranger from exhausting the coordinator: rate limits per network source, and a
cap on the streams (checkpoint and shard downloads) that may hold a gRPC thread at once.

A stream holds one thread of the server's pool while it sends, and a client that never reads
would hold it until the deadline. So a session may have at most `per_session` streams open,
the whole server at most `total` (a fraction of the pool, so unary RPCs such as Join and
Heartbeat always find a thread), and a stream whose client has not taken a message for
`stall_seconds` is cancelled.
"""

import ipaddress
import threading
import time
from collections import OrderedDict


def source_of(peer):
    """The network a gRPC peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678") comes from, as a
    rate-limit key: its /24 (IPv4) or /64 (IPv6) prefix, which one home or one attacker usually
    holds whole."""
    kind, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "other"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return "ip:" + str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class RateLimiter:
    """A token bucket per key: `burst` at once, then `per_second`. Remembers at most `max_keys`
    keys (the least recently used are forgotten, as if full again). Threads: any; buckets and
    refused (how many calls were refused) are under self.lock."""

    def __init__(self, *, burst, per_second, max_keys=10_000, clock=time.monotonic):
        self.burst, self.per_second, self.max_keys, self.clock = burst, per_second, max_keys, clock
        self.buckets = OrderedDict()  # key -> (tokens, at)
        self.refused = 0
        self.lock = threading.Lock()

    def allow(self, key):
        """(allowed, seconds until the next one would be)."""
        with self.lock:
            now = self.clock()
            tokens, at = self.buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.per_second)
            ok = tokens >= 1
            if ok:
                tokens -= 1
            else:
                self.refused += 1
            self.buckets[key] = (tokens, now)
            while len(self.buckets) > self.max_keys:
                self.buckets.popitem(last=False)
            return ok, 0.0 if ok else (1 - tokens) / self.per_second


class Busy(Exception):
    """No room for another stream (the message says whose limit was hit)."""


class StreamGuard:
    """Counts open streams per session and in all; a watchdog cancels stalled ones. Threads: gRPC's
    (stream, count), the watchdog's and the metrics' (cancelled_count) share open, next_id and
    cancelled, all under self.lock."""

    def __init__(self, *, per_session, total, stall_seconds, clock=time.monotonic):
        self.per_session, self.total, self.stall_seconds, self.clock = per_session, total, stall_seconds, clock
        self.lock = threading.Lock()
        self.open = {}  # stream id -> [session, context, last progress]
        self.next_id = 0
        self._stop = threading.Event()
        self.cancelled = 0  # streams cancelled for stalling
        self.thread = threading.Thread(target=self._watch, name="stream-watchdog", daemon=True)
        self.thread.start()

    def stream(self, session, context, chunks):
        """Yield from chunks while this stream holds a slot; Busy if there is none."""
        with self.lock:
            mine = sum(1 for s, _, _ in self.open.values() if s == session)
            if mine >= self.per_session:
                raise Busy(f"this session already has {mine} downloads open (at most {self.per_session})")
            if len(self.open) >= self.total:
                raise Busy(f"the coordinator is serving {len(self.open)} downloads (its limit); retry shortly")
            sid = self.next_id
            self.next_id += 1
            self.open[sid] = [session, context, self.clock()]
        return self._run(sid, chunks)

    def _run(self, sid, chunks):
        try:
            for chunk in chunks:
                yield chunk  # returns once gRPC took the message: the client is reading
                with self.lock:
                    self.open[sid][2] = self.clock()
        finally:
            with self.lock:
                self.open.pop(sid, None)

    def count(self):
        with self.lock:
            return len(self.open)

    def cancelled_count(self):
        with self.lock:
            return self.cancelled

    def _watch(self):
        while not self._stop.wait(min(1.0, self.stall_seconds / 4)):
            now = self.clock()
            with self.lock:
                stalled = [ctx for _, ctx, last in self.open.values() if now - last > self.stall_seconds]
                self.cancelled += len(stalled)
            for ctx in stalled:
                ctx.cancel()

    def close(self):
        self._stop.set()
