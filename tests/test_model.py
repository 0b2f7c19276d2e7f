import pytest
import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.model import GPT, PRESETS, CausalSelfAttention, GPTConfig


def tiny(arch="gpt2", **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16, arch=arch)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("arch", ["gpt1", "gpt2", "gpt3"])
def test_changing_a_future_token_never_changes_earlier_logits(arch):
    model = tiny(arch, attn_window=3)
    x = torch.randint(0, 17, (2, 16))
    base = model(x)[0]
    for t in range(16):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 17
        out = model(y)[0]
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), f"position {t} leaked backwards"
        assert not torch.allclose(out[:, t], base[:, t])  # and the token itself does matter


def test_banded_layer_sees_only_its_window():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=5, block_size=12, n_layer=1, n_head=2, n_embd=8)
    attn = CausalSelfAttention(cfg, window=3).eval()
    x = torch.randn(1, 12, 8)
    base = attn(x)
    y = x.clone()
    y[:, 2] += 1.0
    out = attn(y)
    # query i sees keys i-2..i: token 2 influences outputs 2, 3, 4 only
    changed = (out - base).abs().amax(dim=-1)[0] > 1e-6
    assert changed.tolist() == [False, False, True, True, True] + [False] * 7


def test_gpt3_alternates_dense_and_banded_layers():
    model = tiny("gpt3", n_layer=4, attn_window=5)
    assert [b.attn.window for b in model.transformer.h] == [0, 5, 0, 5]
    assert tiny("gpt3", attn_window=0).config.attn_window == 4  # default block_size // 4


def test_architectures_differ_in_layernorm_placement():
    assert "ln_f" not in tiny("gpt1").transformer
    assert "ln_f" in tiny("gpt2").transformer
    assert tiny("gpt1").transformer.h[0].post_ln and not tiny("gpt2").transformer.h[0].post_ln


def test_shapes_tying_and_init():
    model = tiny(n_layer=4, n_embd=32)
    logits, loss = model(torch.zeros(3, 7, dtype=torch.long), torch.zeros(3, 7, dtype=torch.long))
    assert logits.shape == (3, 7, 17) and loss.shape == ()
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.003  # residual projections scaled by 1/sqrt(2 n_layer)
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.003
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_masked_targets_do_not_count():
    model = tiny()
    x = torch.randint(0, 17, (2, 8))
    y = torch.randint(0, 17, (2, 8))
    y_masked = y.clone()
    y_masked[:, :4] = -1
    _, full = model(x, y)
    _, part = model(x, y_masked)
    logits = model(x)[0]
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 17), y[:, 4:].reshape(-1))
    assert torch.allclose(part, ref) and not torch.allclose(part, full)


@pytest.mark.parametrize("arch", ["gpt1", "gpt2", "gpt3"])
def test_overfits_a_tiny_batch(arch):
    model = tiny(arch, dropout=0.0).train()
    x = torch.randint(0, 17, (4, 16))
    y = torch.roll(x, -1, 1)
    opt = model.optimizer(lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_weight_decay_only_on_matrices():
    model = tiny()
    decay, no_decay = model.optimizer(lr=1e-3, weight_decay=0.1).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(False)


def test_presets_and_bad_configs():
    c = GPTConfig.from_preset("gpt2", 50257, 1024)
    assert (c.n_layer, c.n_head, c.n_embd) == (12, 12, 768)
    assert set(PRESETS) >= {"gpt-nano", "gpt-micro", "gpt-mini", "gopher-44m", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    with pytest.raises(UserError, match="unknown model preset 'gpt5'"):
        GPTConfig.from_preset("gpt5", 10, 10)
    with pytest.raises(UserError, match="divisible"):
        GPTConfig(vocab_size=10, block_size=8, n_head=3, n_embd=16)
    with pytest.raises(UserError, match="architecture"):
        GPTConfig(vocab_size=10, block_size=8, arch="gpt4")


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2", 50257, 1024))
    assert round(model.num_params(False) / 1e6) == 124


def test_flops_per_token_formula():
    model = tiny()
    c = model.config
    assert model.flops_per_token() == 6 * model.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * 16


def test_generate_greedy_topk_topp():
    model = tiny()
    x = torch.randint(0, 17, (1, 5))
    greedy = model.generate(x, 20, greedy=True)
    assert greedy.shape == (1, 25) and torch.equal(greedy[:, :5], x)  # beyond block_size: context is cropped
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(x, 20, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(x, 20, top_p=1e-6, generator=g), greedy)
    a = model.generate(x, 20, temperature=2.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(x, 20, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, greedy)
