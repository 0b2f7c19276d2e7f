"""The GPT language model, in one file, after minGPT and nanoGPT.

Three generations of the architecture are options of one model (config.arch):
- "gpt1": post-LayerNorm blocks, no final LayerNorm (Radford et al. 2018).
- "gpt2": pre-LayerNorm blocks and a final LayerNorm (Radford et al. 2019). The default.
- "gpt3": gpt2 blocks whose attention alternates between dense and locally banded
  (each token sees the previous `attn_window` tokens), as in Brown et al. 2020, section 2.1.
Module names follow GPT-2's, so exporting to Hugging Face is a transpose of the Conv1D weights.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from gptswarm.errors import UserError

ARCHS = ("gpt1", "gpt2", "gpt3")

# minGPT's table of model sizes: name -> (n_layer, n_head, n_embd)
PRESETS = {
    "gpt-nano": (3, 3, 48),
    "gpt-micro": (4, 4, 128),
    "gpt-mini": (6, 6, 192),
    "gopher-44m": (8, 16, 512),
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
    # GPT-3 (Brown et al. 2020, table 2.1): gpt3 blocks (dense and locally banded attention alternating).
    # XL: the paper's 24 heads of 128 do not divide its width of 2048; 16 heads keep its head size of 128
    "gpt3-small": (12, 12, 768),  # 125M
    "gpt3-medium": (24, 16, 1024),  # 350M
    "gpt3-large": (24, 16, 1536),  # 760M
    "gpt3-xl": (24, 16, 2048),  # 1.3B
    "gpt3-2.7b": (32, 32, 2560),  # 2.7B
}


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    arch: str = "gpt2"
    attn_window: int = 0  # gpt3 only: width of the local band; 0 means block_size // 4

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "gpt3" and self.attn_window == 0:
            self.attn_window = max(1, self.block_size // 4)

    @classmethod
    def from_preset(cls, name, vocab_size, block_size, **overrides):
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        kw = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, arch="gpt3" if name.startswith("gpt3") else "gpt2")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(vocab_size=vocab_size, block_size=block_size, **kw)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def banded_causal_mask(T, window, device):
    """(T, T) bool mask, True where query i may attend key j: i - window < j <= i."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (j > i - window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, window=0):
        super().__init__()
        self.n_head = config.n_head
        self.window = window  # 0: dense causal attention
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if self.window and self.window < T:
            mask = banded_causal_mask(T, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # flash kernels on GPU
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu ("gelu_new" in Hugging Face)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, window=0):
        super().__init__()
        self.post_ln = config.arch == "gpt1"
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, window)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        if self.post_ln:  # GPT-1: normalise after the residual sum
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # gpt3: even layers dense, odd layers locally banded
        windows = [config.attn_window if config.arch == "gpt3" and i % 2 else 0 for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, w) for w in windows]),
        ))
        if config.arch != "gpt1":
            self.transformer["ln_f"] = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)

        self.checkpointing = False  # activation checkpointing (a Trainer's choice: TrainConfig.checkpointing)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), two residual adds per block
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (the token
        embedding is shared with the LM head, so it counts)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            if self.checkpointing and self.training and torch.is_grad_enabled():  # keep each block's input
                # alone; its activations are computed again in the backward pass (the same values: no dropout
                # state is involved unless dropout > 0, whose RNG state checkpoint() saves and restores)
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:  # targets of -1 are masked out (e.g. the question part of a sum)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6N + 12 * L * H * Q * T (PaLM, appendix B)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    def param_groups(self, weight_decay=0.1):
        """Optimizer groups: weight decay only on >= 2-D tensors (matmul weights, embeddings)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def optimizer(self, lr, weight_decay=0.1, betas=(0.9, 0.95), fused=None):
        """AdamW over param_groups()."""
        if fused is None:
            fused = next(self.parameters()).device.type == "cuda"
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=lr, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
        """Extend idx (B, T) by max_new_tokens tokens. Greedy takes the argmax; otherwise sample
        from softmax(logits / temperature), restricted to the top_k tokens and/or the smallest
        set whose probability reaches top_p (nucleus sampling)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits = self(idx_cond)[0][:, -1, :].float()  # (B, vocab)
            if greedy:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / max(temperature, 1e-8)
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if top_p is not None:
                    sorted_logits, order = torch.sort(logits, descending=True)
                    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
                    drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keeps at least the top token
                    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                    logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
                nxt = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
