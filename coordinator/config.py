"""How a coordinator process runs (addresses and timing), with every default in one place.
What a run trains (model, data, budget, averaging) is the run's own settings: run.py."""

from dataclasses import dataclass


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str = "0.0.0.0:7733"  # gRPC control plane, HOST:PORT
    p2p_listen: str = "0.0.0.0:7734"  # hivemind peer (every round's averaging goes through it), HOST:PORT
    http_listen: str = "0.0.0.0:7780"  # status page, /api/v1/status, /metrics; "" for none
    announce_host: str = ""  # public host name workers use ("": this host's name)
    heartbeat_interval: float = 1.0  # seconds between a worker's heartbeats
    lease_seconds: float = 60.0  # a lease not extended by a heartbeat for this long expires
    sender_timeout: float = 5.0  # seconds a group member may stay silent in an averaging before it is excluded
    max_leases: int = 2  # active (untrained) leases a worker may hold at once
    quarantine_after: int = 2  # a worker flagged in this many ...
    quarantine_window: int = 5  # ... of the last this many rounds it took part in is quarantined
    max_val_loss_rise: float = 0.25  # a round whose validation loss is this much (relative, + 0.1) above the
    #                                  median of the last 5 evaluated rounds is taken back
    averaging_timeout: float = 60.0  # seconds an averaging may take
    round_timeout: float = 600.0  # a round with any tokens ends after this many seconds
    eval_tokens: int = 65536  # validation tokens per evaluation of theta_global
    score_fraction: float = 0.02  # tokens each contribution is scored on per token claimed (scoring.py); 0: off
    replay_fraction: float = 0.005  # of each round's members, drawn for a replay (replays.py); 0: off
    replay_deadline: float = 1800.0  # seconds a drawn worker has to upload its record
    # transport (gptswarm/transport.py): TLS with the state directory's own certificate unless these say otherwise
    tls_cert: str = ""  # PEM certificate (chain) to present instead of the self-signed one ...
    tls_key: str = ""  # ... and its private key
    plaintext: bool = False  # no TLS: only when listening on loopback (demos, tests)
    grpc_reflection: bool = False  # serve gRPC reflection (lets anyone list the service)
    # bounds on what strangers may take (coordinator/limits.py)
    session_ttl: float = 3600.0  # a session unused (no heartbeat) for this long expires; the worker joins again
    rpc_threads: int = 64  # gRPC server threads
    max_concurrent_rpcs: int = 256  # more concurrent RPCs are answered RESOURCE_EXHAUSTED
    streams_per_session: int = 2  # downloads (shard, checkpoint) one session may have open
    streams_total: int = 16  # downloads open at once in all (a quarter of the threads)
    stream_stall_seconds: float = 60.0  # a download whose client takes nothing for this long is cancelled
    join_burst: int = 20  # joins one network (/24 or /64) may make at once ...
    joins_per_second: float = 0.5  # ... and then per second
    http_connections: int = 32  # status page connections served at once; more are closed
    status_cache_seconds: float = 1.0  # /api/v1/status and /metrics are computed at most this often
