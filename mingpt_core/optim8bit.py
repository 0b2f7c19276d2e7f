"""AdamW whose two moments are kept in 8 bits, blockwise (Dettmers et al. 2022's idea): each block of
BLOCK values of a moment is stored as one fp32 scale (its largest magnitude) and BLOCK float8 codes
of the values over that scale (e4m3: a sign, 4 bits of exponent, 3 of mantissa, so that small values
keep their relative precision, as bitsandbytes' dynamic map does). The second moment is stored as its
square root (half the exponent range). 2 bytes a parameter and 8 bytes a block, against AdamW's 8
bytes a parameter. Plain PyTorch: the same on a CPU and a GPU, no compiler, no extension; the step
decodes a parameter's moments, updates them as torch.optim.AdamW does (decoupled weight decay, bias
correction), and encodes them again. Small tensors (under MIN_NUMEL values) keep fp32 moments."""

import math

import torch

BLOCK = 256
CHUNK = BLOCK << 14  # values a step updates at once (4M: a multiple of BLOCK)
MIN_NUMEL = 4096  # smaller tensors (biases, LayerNorms) keep fp32 moments: their bytes do not matter
DECADES = 7  # the codes cover magnitudes down to 1e-7 of a block's largest
TINY = torch.finfo(torch.float32).tiny


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values a code stands for, over a block's largest magnitude (bitsandbytes' dynamic map, in
    spirit): each decade below 1 holds twice as many values as the one below it, so that precision is
    relative and finest near the largest values; 0 and 1 exactly."""
    pos = []
    for d in range(DECADES):
        n = 2 ** (d + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        pos.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (d - DECADES + 1))
    values = torch.cat(pos + [torch.tensor([1.0], dtype=torch.float64)])
    values = torch.cat([-values[1:], torch.zeros(1, dtype=torch.float64), values]) if signed else \
        torch.cat([torch.zeros(1, dtype=torch.float64), values])
    assert values.numel() == 256, values.numel()
    return values.sort().values.float()


SIGNED, UNSIGNED = dynamic_map(True), dynamic_map(False)


def encode(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 scales) of a flat fp32 tensor, blockwise: the nearest value of `table`."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % BLOCK)).view(-1, BLOCK)
    scale = blocks.abs().amax(1, keepdim=True).clamp_min(TINY)
    table = table.to(x.device)
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(blocks / scale, mids, out_int32=True).to(torch.uint8), scale.squeeze(1)


def decode(codes: torch.Tensor, scales: torch.Tensor, n: int, table: torch.Tensor) -> torch.Tensor:
    return (table.to(codes.device)[codes.long()] * scales.unsqueeze(1)).view(-1)[:n]


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's arguments (lr, betas, eps, weight_decay); param groups as the model gives
    them. State per parameter: step (a 0-d float tensor, as AdamW's), and either exp_avg and
    exp_avg_sq (fp32, small tensors) or exp_avg_codes, exp_avg_scales, exp_avg_sq_codes and
    exp_avg_sq_scales (the square root of exp_avg_sq, encoded)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # which casts every state tensor to its parameter's dtype ...
        for st in self.state.values():  # ... the codes too: back to what they are (0..255, exact in fp32)
            for k in ("exp_avg_codes", "exp_avg_sq_codes"):
                if k in st:
                    st[k] = st[k].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                small = p.numel() < MIN_NUMEL
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    if small:
                        st["exp_avg"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                        st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
                    else:  # zeros, encoded without a full-size temporary: the code of 0, the smallest scale
                        blocks = -(-p.numel() // BLOCK)
                        for k, table in (("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED)):
                            st[f"{k}_codes"] = torch.full((blocks, BLOCK), int((table == 0).nonzero()[0, 0]),
                                                          dtype=torch.uint8, device=p.device)
                            st[f"{k}_scales"] = torch.full((blocks,), TINY, device=p.device)
                st["step"] += 1
                flat, g = p.view(-1), p.grad.view(-1)
                for a in range(0, p.numel(), CHUNK):  # a slice at a time: the decoded moments of one slice
                    # are the step's only temporaries (CHUNK values, whatever the parameter's size)
                    self._update(group, st, small, flat[a:a + CHUNK], g[a:a + CHUNK].float(), a)
        return loss

    @staticmethod
    def _update(group, st, small, p, g, a):
        """AdamW's update of the slice p (from value a of its parameter), its gradient g."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = float(st["step"])
        n = g.numel()
        if small:
            m, v = st["exp_avg"][a:a + n], st["exp_avg_sq"][a:a + n]  # views: updated in place
        else:
            blocks = slice(a // BLOCK, a // BLOCK + -(-n // BLOCK))
            m = decode(st["exp_avg_codes"][blocks], st["exp_avg_scales"][blocks], n, SIGNED)
            v = decode(st["exp_avg_sq_codes"][blocks], st["exp_avg_sq_scales"][blocks], n, UNSIGNED).square_()
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if wd:
            p.mul_(1 - lr * wd)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
        p.add_((m / denom).to(p.dtype), alpha=-lr / (1 - b1 ** t))
        if not small:
            st["exp_avg_codes"][blocks], st["exp_avg_scales"][blocks] = encode(m, SIGNED)
            st["exp_avg_sq_codes"][blocks], st["exp_avg_sq_scales"][blocks] = encode(v.sqrt_(), UNSIGNED)
