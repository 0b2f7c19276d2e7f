"""How a worker runs, with every default in one place (the CLI shows these)."""

import os
from dataclasses import dataclass
from pathlib import Path


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gptswarm" / "worker"


@dataclass(frozen=True)
class WorkerConfig:
    join: str  # the coordinator's HOST:PORT
    token: str = ""  # the swarm token (from GPTSWARM_TOKEN or --token-file, never the command line)
    tls_fingerprint: str = ""  # sha256:<hex> of the coordinator's certificate, as it printed it
    plaintext: bool = False  # no TLS: only to a coordinator on loopback
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    name: str = ""  # public name on the status page ("": the host name)
    # control socket, saved pause, session, throughput cache (computed once, at import: the CLI shows it)
    state_dir: Path = default_state_dir()  # noqa: RUF009
    schedule: str = ""  # local-time training windows (worker/schedule.py); "": always
    idle_only: bool = False  # pause while other processes use the GPU (or the CPU)
    max_hours: float = 0.0  # finish the round and leave after this many hours; 0: never
    max_vram: float = 0.0  # GiB of GPU memory to use at most; 0: no cap
