"""The built-in addition task, after minGPT's projects/adder.

An example for n digits is a (n digits), b (n digits), then the n+1 digits of a+b reversed, e.g.
n=2, 85 + 50 = 135 -> "8550" + "531". Reversal makes the answer come out least significant digit
first, as addition is done by hand. The loss only counts the answer digits. A fixed share of all
(10^n)^2 problems is held out for evaluation.
"""

import numpy as np
import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.data import Shard, ShardSet, chunk, eval_batches
from gptswarm.mingpt_core.tokenizer import Tokenizer

MAX_DIGITS = 4


class AdditionTask:
    def __init__(self, ndigit=2, seed=1337):
        if not 1 <= ndigit <= MAX_DIGITS:
            raise UserError(f"addition digits must be between 1 and {MAX_DIGITS}, got {ndigit}")
        self.ndigit, self.seed = ndigit, seed
        self.tokenizer = Tokenizer.train_char("0123456789")
        self.example_len = 3 * ndigit + 1
        self.block_size = self.example_len - 1  # inputs are the example minus its last digit
        self.loss_start = 2 * ndigit  # first answer digit

    def meta(self):
        return {"task": "addition", "ndigit": self.ndigit, "seed": self.seed}

    def problems(self):
        """(train, held_out): arrays of problem numbers p = a * 10^n + b."""
        num = (10 ** self.ndigit) ** 2
        perm = np.random.default_rng(self.seed).permutation(num)
        n_val = min(1000, num // 10)
        return perm[n_val:], perm[:n_val]

    def encode(self, problems):
        """(N,) problem numbers -> (N, example_len) token ids (token id == digit)."""
        n = self.ndigit
        a, b = problems // 10 ** n, problems % 10 ** n
        c = a + b
        digits = lambda v, k: [(v // 10 ** (k - 1 - i)) % 10 for i in range(k)]  # most significant first
        cols = digits(a, n) + digits(b, n) + digits(c, n + 1)[::-1]
        return np.stack(cols, axis=1).astype(np.uint16)

    def shard_set(self, shard_tokens=65536, block_size=None):
        train, val = self.problems()
        per = max(1, shard_tokens // self.example_len)
        L = self.example_len
        shards = [Shard(p.reshape(-1), "train") for p in chunk(self.encode(train), per, 1)]
        shards += [Shard(p.reshape(-1), "val") for p in chunk(self.encode(val), per, 1)]
        assert all(len(s) % L == 0 for s in shards)
        return ShardSet(shards, self.tokenizer.vocab_size, "examples", L, self.loss_start, self.meta())

    def check_block_size(self, block_size):
        if block_size < self.block_size:
            raise UserError(
                f"block_size {block_size} is too small for {self.ndigit}-digit addition, which needs {self.block_size}")

    @torch.no_grad()
    def accuracy(self, model, device, batch_size=500):
        """Exact-match accuracy of greedy answers on the held-out problems: (correct, total)."""
        _, val = self.problems()
        rows = torch.from_numpy(self.encode(val).astype(np.int64))
        n, correct = self.ndigit, 0
        model.eval()
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size].to(device)
            out = model.generate(batch[:, :2 * n], n + 1, greedy=True)
            correct += (out[:, 2 * n:] == batch[:, 2 * n:]).all(dim=1).sum().item()
        return correct, len(rows)

    def evaluate(self, trainer, shard_set, batch_size=500):
        val_loss = trainer.evaluate(eval_batches(shard_set.split("val"), shard_set, self.block_size, batch_size))
        correct, total = self.accuracy(trainer.model, trainer.device)
        return {"val_loss": round(val_loss, 4), "accuracy": correct / total, "correct": correct, "total": total}
