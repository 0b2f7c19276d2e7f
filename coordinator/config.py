"""How a coordinator process runs (addresses and timing), with every default in one place.
What a run trains (model, data, budget, averaging) is the run's own settings: run.py."""

from dataclasses import dataclass


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str = "0.0.0.0:7733"  # gRPC control plane, HOST:PORT
    dht_listen: str = "0.0.0.0:7734"  # hivemind peer (DHT bootstrap and averaging), HOST:PORT
    http_listen: str = "0.0.0.0:7780"  # status page, /api/v1/status, /metrics; "" for none
    announce_host: str = ""  # public host name workers use ("": this host's name)
    heartbeat_interval: float = 1.0  # seconds between a worker's heartbeats
    lease_seconds: float = 60.0  # a lease not extended by a heartbeat for this long expires
    matchmaking_time: float = 5.0  # seconds the coordinator keeps a round's averaging group open
    averaging_timeout: float = 60.0  # seconds an averaging may take
    round_timeout: float = 600.0  # a round with any tokens ends after this many seconds
    eval_tokens: int = 65536  # validation tokens per evaluation of theta_global
