"""What a run trains on: the built-in addition task or a text file, with one interface
(tokenizer, shard_set(), block_size, evaluate(), meta()) for the trainer, eval and the coordinator."""

import hashlib
from pathlib import Path

from gptswarm.errors import UserError
from gptswarm.mingpt_core.addition import AdditionTask
from gptswarm.mingpt_core.data import eval_batches, read_text, text_shards
from gptswarm.mingpt_core.tokenizer import Tokenizer

TEXT_BLOCK_SIZE = 256  # default context for text tasks


class TextTask:
    """Language modelling on one UTF-8 text file, split 90/10 into train and validation."""

    def __init__(self, path, tokenizer=None, tokenizer_kind="char", vocab_size=None, block_size=None):
        self.path = Path(path)
        self.text = read_text(path)
        self.sha256 = hashlib.sha256(self.text.encode()).hexdigest()
        self.tokenizer = tokenizer or Tokenizer.train(self.text, tokenizer_kind, vocab_size)
        self.block_size = block_size or TEXT_BLOCK_SIZE
        self._ids = None

    def meta(self):
        return {"task": "text", "source": self.path.name, "text_sha256": self.sha256}

    def check_block_size(self, block_size):
        pass  # any context length works for running text (the split must be long enough: shard_set)

    def shard_set(self, shard_tokens=65536, block_size=None):
        if self._ids is None:
            self._ids = self.tokenizer.encode(self.text)
        s = text_shards(self._ids, self.tokenizer.vocab_size, block_size or self.block_size, shard_tokens)
        s.meta = self.meta()
        return s

    def evaluate(self, trainer, shard_set, batch_size=64):
        batches = eval_batches(shard_set.split("val"), shard_set, trainer.model.config.block_size, batch_size,
                               trainer.cfg.eval_tokens)
        return {"val_loss": round(trainer.evaluate(batches), 4)}


def make_task(task=None, text=None, digits=2, tokenizer=None, tokenizer_kind="char", vocab_size=None,
              block_size=None):
    """The task named by the CLI's mutually exclusive --task / --text options."""
    if (task is None) == (text is None):
        raise UserError("give exactly one of --task addition or --text FILE")
    if task is not None:
        if task != "addition":
            raise UserError(f"unknown task {task!r}; the built-in task is 'addition'")
        return AdditionTask(digits)
    return TextTask(text, tokenizer, tokenizer_kind, vocab_size, block_size)


def task_from_meta(meta, text=None, tokenizer=None):
    """Rebuild the task a checkpoint was trained on (for resume and eval)."""
    kind = meta.get("task")
    if kind == "addition":
        return AdditionTask(meta.get("ndigit", 2), meta.get("seed", 1337))
    if kind == "text":
        if text is None:
            raise UserError("this checkpoint was trained on a text file: pass it with --text FILE")
        return TextTask(text, tokenizer)
    raise UserError(f"checkpoint names an unknown task {kind!r}")
