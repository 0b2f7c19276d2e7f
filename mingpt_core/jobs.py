"""The jobs behind `gptswarm train`, `eval` and `sample`: importable, so tests call them directly."""

from pathlib import Path

import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core import checkpoint
from gptswarm.mingpt_core.data import Batches
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.tasks import make_task, task_from_meta
from gptswarm.mingpt_core.trainer import Trainer, TrainConfig, fit, resolve_device


def check_out_dir(out, resume, overwrite):
    out = Path(out)
    if resume:
        if not checkpoint.is_checkpoint(out):
            raise UserError(f"--resume: {out} holds no checkpoint to resume")
        if not (out / "optimizer.safetensors").exists():
            raise UserError(f"--resume: {out} has no optimizer state (optimizer.safetensors); it cannot be resumed")
    elif checkpoint.is_checkpoint(out):
        if not overwrite:
            raise UserError(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to replace it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a gptswarm checkpoint; choose another --out")


def build_model(tokenizer, task, model="gpt-micro", block_size=None, **overrides):
    """A fresh GPT for a task: preset sizes, overridden by explicit n_layer/n_head/n_embd/arch/..."""
    bs = block_size or task.block_size
    task.check_block_size(bs)
    config = GPTConfig.from_preset(model, tokenizer.vocab_size, bs, **overrides)
    return GPT(config)


def train(out, *, task=None, text=None, digits=2, tokenizer_kind="char", vocab_size=None, model="gpt-micro",
          block_size=None, model_overrides=None, train_config=None, device="auto", resume=False, overwrite=False,
          shard_tokens=65536, progress=True):
    """Train a GPT locally and keep its checkpoint in `out`; returns the evaluation history.
    Everything is checked before anything is written."""
    out = Path(out)
    check_out_dir(out, resume, overwrite)
    device = resolve_device(device)
    if resume:
        model_, tokenizer, meta = checkpoint.load(out, "cpu")
        cfg = TrainConfig.from_dict(meta.get("train", {}))
        cfg.max_iters = train_config.max_iters if train_config else cfg.max_iters
        if cfg.max_iters <= meta.get("step", 0):
            raise UserError(f"{out} is already at step {meta.get('step')}; pass a larger --max-iters to go on")
        given = "addition" if task == "addition" else "text" if text is not None and task is None else task
        if given != meta.get("task"):
            raise UserError(f"{out} was trained on task {meta.get('task')!r}; resume it with the same --task/--text")
        t = task_from_meta(meta, text, tokenizer)
        if given == "text" and t.sha256 != meta.get("text_sha256"):
            raise UserError(f"{text} is not the text this checkpoint was trained on")
        extra = checkpoint.load_extra(out)
    else:
        cfg = train_config or TrainConfig()
        t = make_task(task, text, digits, None, tokenizer_kind, vocab_size, block_size)
        tokenizer = t.tokenizer
        torch.manual_seed(cfg.seed)
        model_ = build_model(tokenizer, t, model, block_size, **(model_overrides or {}))
        meta, extra = {}, None
    shards = t.shard_set(shard_tokens, model_.config.block_size)
    trainer = Trainer(model_, cfg, device)
    batches = Batches(shards.split("train"), shards, model_.config.block_size, cfg.batch_size, cfg.seed)
    if resume:
        trainer.load_state(extra, meta, batches)

    def save(metrics):
        checkpoint.save(out, trainer.model, tokenizer, {**trainer.state_meta(), **t.meta(), "metrics": metrics},
                        trainer.state_tensors(batches))

    return fit(trainer, batches, evaluate=lambda: t.evaluate(trainer, shards), save=save, progress=progress)


def evaluate(directory, *, task=None, text=None, device="auto"):
    """Metrics of a checkpoint: held-out accuracy and loss for addition, validation loss for text."""
    device = resolve_device(device)
    model, tokenizer, meta = checkpoint.load(directory, device)
    t = make_task(task, text, tokenizer=tokenizer)  # the same --task / --text checks as train
    if task is not None:
        if meta.get("task") != "addition":
            raise UserError(f"{directory} was not trained on the addition task (task: {meta.get('task')!r})")
        t = task_from_meta(meta)  # its digits and held-out split, not the defaults
    shards = t.shard_set(block_size=model.config.block_size)
    trainer = Trainer(model, TrainConfig(), device)
    return {"checkpoint": str(directory), "step": meta.get("step"), "round": meta.get("round"),
            "tokens_trained": meta.get("tokens_trained"), **t.evaluate(trainer, shards)}


def sample(directory, prompt, *, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None, greedy=False,
           seed=None, device="auto"):
    """The prompt followed by the model's continuation."""
    if not prompt:
        raise UserError("--prompt is empty; give at least one character")
    if temperature <= 0 and not greedy:
        raise UserError("--temperature must be positive (use --greedy for argmax decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if top_k is not None and top_k < 1:
        raise UserError("--top-k must be at least 1")
    device = resolve_device(device)
    model, tokenizer, _ = checkpoint.load(directory, device)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, max_new_tokens, temperature, top_k, top_p, greedy, gen)
    return tokenizer.decode(out[0].tolist())
