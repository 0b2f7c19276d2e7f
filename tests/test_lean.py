"""The memory-lean worker's training (mingpt_core/plan.py's choices: 8-bit blockwise AdamW state,
activation checkpointing, micro-batches) against the full-memory path on gpt-micro, as the swarm
runs it: rounds of inner steps from theta_global, the pseudo-gradient, the outer Nesterov step. The
same direction after one round (cosine >= 0.999), the same validation loss after ten (within 1%).
And the presets, the plan's choices and its refusal."""

import json

import pytest
import torch
from conftest import run_cli

from gptswarm.errors import UserError
from gptswarm.mingpt_core.data import Batches, text_shards
from gptswarm.mingpt_core.model import GPT, PRESETS, GPTConfig
from gptswarm.mingpt_core.optim8bit import AdamW8bit
from gptswarm.mingpt_core.plan import GIB, fit, largest_preset, make
from gptswarm.mingpt_core.trainer import TrainConfig, Trainer, evaluate_loss
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds.outer import outer_step, pseudo_gradient
from gptswarm.rounds.theta import theta_views
from gptswarm.worker import run_config

STEPS, BATCH, BLOCK = 16, 8, 64


def swarm_rounds(text, rounds, **lean):
    """One worker's rounds on text (the outer step as the coordinator takes it); the pseudo-gradient of
    the first round and the validation loss after the last. (Shakespeare, whose loss falls smoothly: on
    the addition task, a last-bit difference in one step moved the loss after ten rounds by 3%, as much
    as another data order did by 11%.)"""
    chars = sorted(set(text))
    shard_set = text_shards([chars.index(c) for c in text], len(chars), BLOCK, shard_tokens=8192)
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt-micro", len(chars), BLOCK)
    global_model, model = GPT(cfg), GPT(cfg)
    theta = theta_views(global_model)
    momentum = {k: torch.zeros_like(v) for k, v in theta.items()}
    trainer = Trainer(model, TrainConfig(batch_size=BATCH, max_iters=rounds * STEPS, warmup_iters=4,
                                         learning_rate=2e-3, **lean))
    data = Batches(shard_set.split("train"), shard_set, BLOCK, BATCH, seed=3)
    first = None
    for _ in range(rounds):
        model.load_state_dict(global_model.state_dict())
        for _ in range(STEPS):
            trainer.train_step(*data.next())
        grad = pseudo_gradient(theta, theta_views(model))
        first = first if first is not None else torch.cat([g.reshape(-1) for g in grad.values()])
        outer_step(theta, momentum, grad, 0.7, 0.9)
    val = list(Batches(shard_set.split("val"), shard_set, BLOCK, 32, seed=5).next() for _ in range(4))
    return first, evaluate_loss(global_model, val)


def test_the_lean_path_trains_as_the_full_one(small_text):
    text = small_text.read_text()
    full_grad, full_loss = swarm_rounds(text, 10)
    lean_grad, lean_loss = swarm_rounds(text, 10, optimizer="adamw8bit", checkpointing=True, micro_batch_size=2)
    cosine = float(torch.nn.functional.cosine_similarity(full_grad, lean_grad, dim=0))
    assert cosine >= 0.999, cosine
    assert abs(lean_loss - full_loss) <= 0.01 * full_loss, (lean_loss, full_loss)


def test_checkpointing_changes_no_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt-micro", 65, 64, arch="gpt3"))
    x = torch.randint(65, (4, 64))
    grads = []
    for on in (False, True):
        model.checkpointing = on
        model.zero_grad()
        model(x, x)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_8bit_state_takes_a_quarter_of_the_bytes_and_survives_a_checkpoint():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt-micro", 65, 64))
    opt = AdamW8bit(model.param_groups(0.1), lr=1e-3)
    x = torch.randint(65, (4, 64))
    model(x, x)[1].backward()
    opt.step()
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    n = sum(p.numel() for p in model.parameters())
    assert state_bytes < 0.3 * 8 * n  # AdamW: 8 bytes a parameter
    again = AdamW8bit(model.param_groups(0.1), lr=1e-3)
    again.load_state_dict(opt.state_dict())
    for p in opt.state:
        for k, v in opt.state[p].items():
            assert again.state[p][k].dtype == v.dtype and torch.equal(again.state[p][k], v)


def test_gpt3_presets_have_the_papers_sizes():
    sizes = {"gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9, "gpt3-2.7b": 2.7e9}
    for name, n in sizes.items():
        cfg = GPTConfig.from_preset(name, 50257, 2048)
        assert cfg.arch == "gpt3" and cfg.attn_window == 512
        with torch.device("meta"):
            params = GPT(cfg).num_params()
        assert abs(params - n) / n < 0.05, (name, params)
    assert set(sizes) <= set(PRESETS)


def test_the_plan_gives_up_throughput_only_as_the_cap_shrinks():
    cfg = GPTConfig.from_preset("gpt3-xl", 50257, 1024)
    roomy = fit(cfg, batch_size=12, cap=80 * GIB)
    assert (roomy.optimizer, roomy.checkpointing, roomy.micro_batch) == ("adamw", False, 12)
    at24 = fit(cfg, batch_size=12, cap=24 * GIB)
    assert at24.fits and at24.optimizer == "adamw8bit" and not at24.checkpointing and at24.device_total <= 24 * GIB
    at16 = fit(cfg, batch_size=12, cap=16 * GIB)
    assert at16.fits and at16.checkpointing
    tiny = fit(cfg, batch_size=12, cap=4 * GIB)
    assert not tiny.fits and tiny.micro_batch == 1 and tiny.checkpointing
    # the parts add up: weights and gradients 4 bytes a parameter each, AdamW 8, 8-bit about 2
    p = make(cfg, batch_size=8, micro=8, optimizer="adamw", checkpointing=False, value_bytes=2, cap=None)
    assert p.device["weights"] == p.device["gradients"] == 4 * p.n_params
    assert p.device["optimizer state"] == 8 * p.n_params
    assert at24.device["optimizer state"] < 2.1 * at24.n_params
    assert largest_preset(vocab_size=50257, block_size=1024, batch_size=8, cap=8 * GIB) in ("gpt2-medium",
                                                                                             "gpt3-medium")


def test_plan_command_and_the_join_check(monkeypatch):
    out = run_cli("plan", "--model", "gpt3-xl", "--vram", "24").stdout
    assert "adamw8bit" in out and "fits" in out and "optimizer state" in out
    out = run_cli("plan", "--model", "gpt3-2.7b", "--vram", "4").stdout
    assert "does not fit in 4 GiB" in out and "the largest preset that does" in out
    # a GPU with 6 GiB free (the hardware's answer, stood in for) and a gpt3-xl run: refused in one line
    cfg = pb.RunConfig(model_config_json=json.dumps(GPTConfig.from_preset("gpt3-xl", 50257, 1024).to_dict()),
                       train_config_json=json.dumps({"batch_size": 8}),
                       shards_json=json.dumps({"vocab_size": 50257, "layout": "stream"}), compression="8bit")
    monkeypatch.setattr(run_config, "memory_available", lambda device: (1 << 40, 6 * GIB))
    with pytest.raises(UserError, match=r"needs about .* GiB of cpu under --max-vram even one sequence at a time.*"
                                        r"the largest preset that could: gpt"):
        run_config.parse(cfg, torch.device("cpu"), max_vram=5)
    monkeypatch.setattr(run_config, "memory_available", lambda device: (1 << 40, 40 * GIB))
    spec = run_config.parse(cfg, torch.device("cpu"), max_vram=24)
    assert spec.plan.fits and spec.plan.optimizer == "adamw8bit"
