"""The code's shape holds: files stay small, SQL lives in the ledger alone, the worker imports nothing
of the coordinator, states are spelled once (gptswarm/states.py), and the typed boundaries type-check
(mypy, on the modules pyproject.toml's [tool.mypy] names)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["coordinator", "worker", "gptswarm", "mingpt_core"]
MAX_LINES = 500
SQL = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+TABLE)\b",
                 re.IGNORECASE | re.DOTALL)
GENERATED = {"gptswarm_pb2.py", "gptswarm_pb2_grpc.py", "gptswarm_pb2.pyi"}


def sources(*folders):
    """Python files of the given top-level folders (gptswarm/'s links to the others are not followed twice)."""
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            real = path.resolve()
            if path.name in GENERATED or "static" in path.parts:
                continue
            if folder == "gptswarm" and real.relative_to(ROOT).parts[0] != "gptswarm":
                continue  # a link to another top-level folder: checked there
            yield path


def strings(path):
    """(line, text) of every string constant in a file, f-strings' literal parts included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_file_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in sources(*PACKAGES) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_sql_lives_in_the_ledger_alone():
    ledger = ROOT / "coordinator" / "ledger"
    outside = [f"{p.relative_to(ROOT)}:{line}" for p in sources(*PACKAGES, "bench")
               if ledger not in p.resolve().parents for line, text in strings(p) if SQL.search(text)]
    assert not outside, f"SQL outside coordinator/ledger/: {outside}"


def test_the_worker_imports_nothing_of_the_coordinator():
    bad = []
    for p in sources("worker"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{p.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                    if n.startswith(("coordinator", "gptswarm.coordinator"))]
    assert not bad, f"the worker imports the coordinator: {bad}"


def test_states_are_spelled_once():
    from gptswarm import states

    names = {m.value for enum in (states.Phase, states.Place, states.RoundState, states.LeaseState,
                                  states.ShardState, states.WorkerState, states.ReducerState) for m in enum}
    spelled = []
    for p in sources("coordinator", "worker", "gptswarm"):
        rel = p.resolve().relative_to(ROOT)
        if rel.parts[:2] == ("coordinator", "ledger") or rel == Path("gptswarm/states.py"):
            continue
        tree = ast.parse(p.read_text())
        keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if k is not None}
        spelled += [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in names and id(node) not in keys]
    assert not spelled, f"states spelled outside gptswarm/states.py and the ledger: {spelled}"


def test_the_typed_boundaries_type_check():
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
