import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ.get("GPTSWARM_SHAKESPEARE", REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))


@pytest.fixture(scope="session")
def shakespeare_path():
    if not SHAKESPEARE.is_file():
        pytest.fail(f"test data missing: {SHAKESPEARE} (set GPTSWARM_SHAKESPEARE)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, shakespeare_path):
    """The first 60k characters of tinyshakespeare, as a file."""
    p = tmp_path_factory.mktemp("text") / "small.txt"
    p.write_text(shakespeare_path.read_text()[:60_000])
    return p


def run_cli(*args, timeout=300, env=None):
    """Run the installed `gptswarm` console script; returns CompletedProcess with text output."""
    exe = Path(sys.executable).with_name("gptswarm")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
