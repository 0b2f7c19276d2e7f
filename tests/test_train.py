import json

import pytest
import torch
from safetensors.torch import load_file

from gptswarm.errors import UserError
from gptswarm.mingpt_core import checkpoint, jobs
from gptswarm.mingpt_core.addition import AdditionTask
from gptswarm.mingpt_core.trainer import Trainer, TrainConfig, resolve_dtype
from gptswarm.rounds.theta import theta_hash

MODEL = dict(n_layer=2, n_head=2, n_embd=32, dropout=0.1)  # dropout: resume must restore the RNG too


def cfg(max_iters, **kw):
    return TrainConfig(max_iters=max_iters, batch_size=8, lr_decay_iters=30, warmup_iters=5, eval_interval=10, **kw)


def test_resumed_run_is_bit_identical(tmp_path, small_text):
    common = dict(text=small_text, model="gpt-nano", block_size=32, model_overrides=MODEL, device="cpu",
                  shard_tokens=8192, progress=False)
    jobs.train(tmp_path / "straight", train_config=cfg(30), **common)
    jobs.train(tmp_path / "resumed", train_config=cfg(10), **common)
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["meta"]["step"] == 10
    jobs.train(tmp_path / "resumed", train_config=TrainConfig(max_iters=30), resume=True, **common)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    meta = checkpoint.read_config(tmp_path / "resumed")["meta"]
    assert meta["step"] == 30 and meta["tokens_trained"] == 30 * 8 * 32 and meta["metrics"]["val_loss"] < 4.0


def test_loss_falls_on_addition(tmp_path):
    hist = jobs.train(tmp_path / "add", task="addition", model="gpt-nano", device="cpu", progress=False,
                      train_config=TrainConfig(max_iters=60, batch_size=32, learning_rate=3e-3, eval_interval=30,
                                               warmup_iters=5))
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] < 2.4
    assert set(hist[-1]) >= {"accuracy", "correct", "total", "tokens_per_second"}
    metrics = jobs.evaluate(tmp_path / "add", task="addition", device="cpu")
    assert metrics["total"] == 1000 and metrics["val_loss"] == hist[-1]["val_loss"]


def test_resume_guards(tmp_path, small_text):
    common = dict(text=small_text, model="gpt-nano", block_size=16, device="cpu", progress=False)
    jobs.train(tmp_path / "r", train_config=cfg(10), **common)
    with pytest.raises(UserError, match="already holds a checkpoint"):
        jobs.train(tmp_path / "r", train_config=cfg(10), **common)
    with pytest.raises(UserError, match="already at step 10"):
        jobs.train(tmp_path / "r", train_config=TrainConfig(max_iters=10), resume=True, **common)
    with pytest.raises(UserError, match="trained on task 'text'"):
        jobs.train(tmp_path / "r", task="addition", train_config=TrainConfig(max_iters=20), resume=True, device="cpu")
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[:-10])
    with pytest.raises(UserError, match="is not the text this checkpoint was trained on"):
        jobs.train(tmp_path / "r", text=other, train_config=TrainConfig(max_iters=20), resume=True, device="cpu")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a gptswarm checkpoint"):
        jobs.train(tmp_path / "notes", train_config=cfg(10), **common)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "add"
    jobs.train(out, task="addition", model="gpt-nano", device="cpu", progress=False,
               train_config=TrainConfig(max_iters=2, eval_interval=2))
    return out


def copy_ckpt(ckpt, dst):
    import shutil
    shutil.copytree(ckpt, dst)
    return dst


def test_corrupt_checkpoints_are_refused(ckpt, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "trunc")
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="model.safetensors is corrupt"):
        checkpoint.load(bad)

    bad = copy_ckpt(ckpt, tmp_path / "shape")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["n_embd"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not match its model config"):
        checkpoint.load(bad)

    bad = copy_ckpt(ckpt, tmp_path / "vocab")
    cfg["model"]["n_embd"] = 48
    cfg["model"]["vocab_size"] = 11
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="tokenizer has 10 tokens but the model expects 11"):
        checkpoint.load(bad)

    bad = copy_ckpt(ckpt, tmp_path / "json")
    (bad / "config.json").write_text("{")
    with pytest.raises(UserError, match="config.json is corrupt"):
        checkpoint.load(bad)
    with pytest.raises(UserError, match="is not a gptswarm checkpoint"):
        checkpoint.load(tmp_path)


def test_theta_hash_sees_every_bit(ckpt):
    model, _, _ = checkpoint.load(ckpt)
    t = checkpoint.model_tensors(model)
    h = theta_hash(t)
    assert h == theta_hash({k: v.clone() for k, v in t.items()})
    t["transformer.ln_f.bias"][3] = torch.nextafter(t["transformer.ln_f.bias"][3], torch.tensor(1.0))
    assert theta_hash(t) != h


def test_precision_policy_and_schedule():
    assert resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    task = AdditionTask(2)
    model = jobs.build_model(task.tokenizer, task, "gpt-nano")
    tr = Trainer(model, TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1), "cpu")
    lrs = [tr.lr(i) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0  # warmup
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))  # cosine decay
    assert lrs[100] == lrs[119] == 0.1
    assert not tr.scaler.is_enabled()


class OutOfMemoryAbove(torch.nn.Module):
    """A model whose forward raises CUDA's OutOfMemoryError above a batch size: the GPU-memory
    boundary, stood in for on a CPU-only machine. The trainer's reaction is the real one."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.config = inner, limit, inner.config
        self.seen = []

    def forward(self, x, y=None):
        self.seen.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x, y)

    def optimizer(self, *a, **kw):
        return self.inner.optimizer(*a, **kw)


def test_out_of_memory_shrinks_the_micro_batch_not_the_step():
    task = AdditionTask(2)
    torch.manual_seed(0)
    ref = jobs.build_model(task.tokenizer, task, "gpt-nano")
    torch.manual_seed(0)
    small = OutOfMemoryAbove(jobs.build_model(task.tokenizer, task, "gpt-nano"), limit=5)
    x = torch.randint(0, 10, (16, 6))
    y = torch.randint(0, 10, (16, 6))
    a, b = Trainer(ref, TrainConfig(max_iters=10), "cpu"), Trainer(small, TrainConfig(max_iters=10), "cpu")
    la, lb = a.train_step(x, y), b.train_step(x, y)
    assert b.cfg.micro_batch_size == 4 and small.seen[:3] == [16, 8, 4]  # 16 -> 8 -> 4 fits
    assert b.step == 1 and b.tokens == x.numel()
    assert torch.allclose(la, lb, atol=1e-5)  # the same step, accumulated over 4 slices
    for p, q in zip(ref.parameters(), small.inner.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    tiny = OutOfMemoryAbove(jobs.build_model(task.tokenizer, task, "gpt-nano"), limit=0)
    with pytest.raises(torch.OutOfMemoryError):  # nothing fits: a clear error, not a loop
        Trainer(tiny, TrainConfig(max_iters=10), "cpu").train_step(x, y)


def test_gpus_without_bf16_train_in_fp16_with_a_grad_scaler(monkeypatch):
    # which GPU we are on is the hardware boundary: ask for a pre-Ampere card's answer
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(torch.device("cuda")) == torch.bfloat16
    # the fp16 path itself (autocast + GradScaler) runs on the CPU as well: it trains
    task = AdditionTask(2)
    torch.manual_seed(0)
    tr = Trainer(jobs.build_model(task.tokenizer, task, "gpt-nano"),
                 TrainConfig(max_iters=40, dtype="float16", warmup_iters=0, learning_rate=3e-3), "cpu")
    assert tr.scaler.is_enabled() and tr.dtype == torch.float16
    x = torch.randint(0, 10, (32, 6))
    losses = [tr.train_step(x, x).item() for _ in range(40)]
    assert losses[-1] < losses[0] - 0.5 and tr.state_meta()["scaler"]["scale"] > 0
