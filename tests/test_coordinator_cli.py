"""`gptswarm coordinator` refuses what it cannot do with one line and a non-zero exit."""

import socket

from conftest import run_cli


def assert_one_line_error(r, *needles):
    """The coordinator logs as it starts; what matters is that it ends on one clear error line."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr
    last = [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("Error: "), r.stderr
    for n in needles:
        assert n in last, last

BASE = ["coordinator", "--listen", "127.0.0.1:0", "--p2p-listen", "127.0.0.1:0"]


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("coordinator", "--task", "addition", "--state-dir", tmp_path / "sd", "--listen", f"127.0.0.1:{port}",
                    "--p2p-listen", "127.0.0.1:0", timeout=120)
    assert_one_line_error(r, f"cannot listen on 127.0.0.1:{port}")


def test_resume_refuses_contradicting_flags(tmp_path, small_text):
    sd = tmp_path / "sd"
    with socket.socket() as s:  # make the first start fail after the run is prepared: occupied port
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("coordinator", "--text", small_text, "--block-size", "32", "--state-dir", sd,
                    "--listen", f"127.0.0.1:{s.getsockname()[1]}", "--p2p-listen", "127.0.0.1:0", timeout=120)
    assert r.returncode != 0 and (sd / "run.json").exists()
    assert_one_line_error(run_cli(*BASE, "--task", "addition", "--state-dir", sd), "holds a run on task 'text'")
    assert_one_line_error(run_cli(*BASE, "--model", "gpt-mini", "--state-dir", sd), "uses model 'gpt-nano', not 'gpt-mini'")
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[::-1])
    assert_one_line_error(run_cli(*BASE, "--text", other, "--state-dir", sd), "is not the text the run")


def test_bad_new_run(tmp_path):
    assert_one_line_error(run_cli(*BASE, "--task", "addition", "--model", "gpt5", "--state-dir", tmp_path / "a"),
                          "unknown model preset")
    assert not (tmp_path / "a").exists()  # validated before anything is written
    assert_one_line_error(run_cli(*BASE, "--state-dir", tmp_path / "b"), "--task addition or --text FILE")
    for flags, needle in ((["--topk-fraction", "0"], "--topk-fraction must be in (0, 1]"),
                          (["--round-growth", "0.5"], "--round-growth must be between 1 and 1000")):
        assert_one_line_error(run_cli(*BASE, "--task", "addition", "--state-dir", tmp_path / "c", *flags), needle)
        assert not (tmp_path / "c").exists()


def test_rounds_grow_with_the_runs_progress():
    from gptswarm.coordinator.run import RunSettings

    s = RunSettings("r", {}, {}, {}, tokens_per_round=1000, max_tokens=100_000, round_growth=4.0)
    assert [s.round_target(t) for t in (0, 50_000, 100_000, 10**9)] == [1000, 2500, 4000, 4000]
    assert RunSettings("r", {}, {}, {}, tokens_per_round=1000).round_target(10**9) == 1000  # fixed by default
