"""Local control of a running worker: `gptswarm worker status | pause | resume | finish` talk to
it through a Unix socket in its state directory (only this machine's users with access to that
directory can). One JSON request per connection, one JSON answer."""

import hashlib
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptswarm.errors import UserError

COMMANDS = ("status", "pause", "resume", "finish")
MAX_SOCKET_PATH = 100  # a Unix socket's path must fit in 108 bytes


def socket_path(state_dir: Path | str) -> Path:
    """STATE_DIR/control.sock, or, where that path is too long for a Unix socket, a short one in a
    private directory of this user's under the temporary directory, named after the state dir."""
    path = Path(state_dir).resolve() / "control.sock"
    if len(str(path).encode()) <= MAX_SOCKET_PATH:
        return path
    private = Path(tempfile.gettempdir()) / f"gptswarm-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    if private.stat().st_uid != os.getuid() or private.stat().st_mode & 0o077:
        raise UserError(f"{private} is not a private directory of yours; give the worker a shorter --state-dir")
    return private / (hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".sock")


class ControlServer:
    """The control socket in state_dir; handle(command) -> the JSON answer (Worker.on_control).

    Its thread serves one connection at a time and calls handle() on it: handle must touch only
    what guards itself (the worker's PausePolicy and SharedState, each under its own lock)."""

    def __init__(self, state_dir: Path | str, handle: Callable[[str], dict[str, Any]]) -> None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.state_dir = Path(state_dir)
        self.path = socket_path(state_dir)
        self.handle = handle  # fn(command) -> dict
        if self.path.exists():
            if ping(self.path):
                raise UserError(f"another worker is already running with state directory {self.state_dir}")
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    line = conn.makefile().readline()
                    if not line:
                        continue  # a ping: connected and hung up
                    cmd = json.loads(line).get("cmd")
                    reply = self.handle(cmd) if cmd in COMMANDS else {"error": f"unknown command {cmd!r}"}
                except Exception as e:  # noqa: BLE001 (a bad request must not hurt the worker)
                    reply = {"error": f"{type(e).__name__}: {e}"}
                try:
                    conn.sendall((json.dumps(reply) + "\n").encode())
                except OSError:
                    pass  # the client went away

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def ping(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(path))
            return True
    except OSError:
        return False


def send(state_dir: Path | str, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send a command to the worker running with state_dir; its JSON answer."""
    path = socket_path(state_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall((json.dumps({"cmd": cmd}) + "\n").encode())
            reply = json.loads(s.makefile().readline())
    except (FileNotFoundError, ConnectionRefusedError):
        raise UserError(f"no worker is running with state directory {state_dir} "
                        "(start one with `gptswarm worker --join HOST:PORT`)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"the worker at {state_dir} did not answer: {e}") from None
    if "error" in reply:
        raise UserError(reply["error"])
    return reply
