"""The CLI's error paths: one clear line, a non-zero exit, no traceback, nothing overwritten."""

import hashlib
import json

import pytest

from conftest import run_cli

TRAIN = ["train", "--model", "gpt-nano", "--max-iters", "2", "--eval-interval", "2", "--quiet"]


def assert_one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    text = d / "tiny.txt"
    text.write_text("hello world, the quick brown fox jumps over the lazy dog.\n" * 40)
    out = d / "ckpt"
    r = run_cli(*TRAIN, "--text", text, "--block-size", "16", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "saved checkpoint" in r.stdout
    return out, text


def test_train_eval_sample_round_trip(char_ckpt):
    out, text = char_ckpt
    r = run_cli("eval", out, "--text", text, "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["step"] == 2 and 0 < m["val_loss"] < 10
    r = run_cli("sample", out, "--prompt", "hello", "--max-new-tokens", "10", "--greedy")
    assert r.returncode == 0 and r.stdout.startswith("hello") and len(r.stdout.rstrip("\n")) == 15


def test_unknown_preset(tmp_path):
    r = run_cli(*TRAIN, "--task", "addition", "--model", "gpt5", "--out", tmp_path / "x")
    assert_one_line_error(r, "unknown model preset 'gpt5'", "gpt-nano")
    assert not (tmp_path / "x").exists()


def test_empty_and_non_utf8_text(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfe")
    assert_one_line_error(run_cli(*TRAIN, "--text", tmp_path / "empty.txt", "--out", tmp_path / "o"), "is empty")
    assert_one_line_error(run_cli(*TRAIN, "--text", tmp_path / "bin.txt", "--out", tmp_path / "o"), "not UTF-8")
    assert_one_line_error(run_cli(*TRAIN, "--text", tmp_path / "nope.txt", "--out", tmp_path / "o"), "no such file")
    assert_one_line_error(run_cli(*TRAIN, "--out", tmp_path / "o"), "--task addition or --text FILE")
    assert not (tmp_path / "o").exists()


def test_character_outside_vocabulary(char_ckpt, tmp_path):
    out, _ = char_ckpt
    assert_one_line_error(run_cli("sample", out, "--prompt", "hello Z"), "'Z' (U+005A) is not in the tokenizer's vocabulary")
    other = tmp_path / "other.txt"
    other.write_text("ZZZZ " * 200)
    assert_one_line_error(run_cli("eval", out, "--text", other), "'Z'")


def test_block_size_too_small(tmp_path):
    r = run_cli(*TRAIN, "--task", "addition", "--block-size", "4", "--out", tmp_path / "o")
    assert_one_line_error(r, "block_size 4 is too small for 2-digit addition")


def test_corrupt_and_mismatched_checkpoint(char_ckpt, tmp_path):
    import shutil
    out, text = char_ckpt
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run_cli("sample", bad, "--prompt", "h"), "model.safetensors is corrupt")
    assert_one_line_error(run_cli("eval", tmp_path, "--text", text), "not a gptswarm checkpoint")
    assert_one_line_error(run_cli("eval", out, "--task", "addition"), "was not trained on the addition task")


def test_nothing_is_overwritten(char_ckpt):
    out, text = char_ckpt
    before = digest(out)
    r = run_cli(*TRAIN, "--text", text, "--block-size", "16", "--out", out)
    assert_one_line_error(r, "already holds a checkpoint", "--resume", "--overwrite")
    r = run_cli(*TRAIN, "--text", text, "--block-size", "16", "--out", out, "--resume")
    assert_one_line_error(r, "already at step 2")
    r = run_cli("export", out, "--out", out)
    assert_one_line_error(r, "is not empty")
    assert digest(out) == before


def test_help_explains_every_option():
    for cmd in ("train", "eval", "sample", "export"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0
        opts = [l.strip().split()[0] for l in r.stdout.splitlines() if l.strip().startswith("--")]
        assert opts, cmd
        for line in r.stdout.split("Options:")[1].split("\n  -")[1:]:
            assert len(line.split()) > 2, f"{cmd}: option without help: {line!r}"
