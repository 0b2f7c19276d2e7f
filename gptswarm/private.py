"""Files and directories only their owner may read: the swarm token, TLS and hivemind keys, a
worker's session, and the state directories that hold them."""

import os
from pathlib import Path


def private_dir(path):
    """Create path (and its parents) if needed, and make it 0700; returns it as a Path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def write_private(path, data):
    """Create (or replace) a file readable by its owner only, in one step: there is no moment at
    which others could read it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
