"""The `gptswarm` command. A thin layer: it parses options and calls importable functions."""

import json
import sys

import click

from gptswarm.errors import UserError
from gptswarm.mingpt_core.model import ARCHS, PRESETS
from gptswarm.mingpt_core.trainer import DTYPES, TrainConfig

TRAIN = TrainConfig()  # `gptswarm train` shows the trainer's own defaults

TASK_OPTIONS = [
    click.option("--task", type=click.Choice(["addition"]), help="Train on a built-in task: 'addition' "
                 "(n-digit a+b, answer digits reversed, as in minGPT)."),
    click.option("--text", type=click.Path(dir_okay=False), help="Train on a UTF-8 text file "
                 "(first 90%% for training, last 10%% for validation)."),
]


def task_options(f):
    for opt in reversed(TASK_OPTIONS):
        f = opt(f)
    return f


class Group(click.Group):
    """Turns a UserError anywhere below into one 'Error: ...' line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gptswarm")
def cli():
    """Train one GPT together: a coordinator leases data shards and averages what volunteer
    workers learn; `train`, `eval`, `sample` and `export` work on a single machine."""


@cli.command()
@task_options
@click.option("--digits", default=2, show_default=True, help="Digits per operand for --task addition.")
@click.option("--tokenizer", "tokenizer_kind", type=click.Choice(["char", "bpe"]), default="char", show_default=True,
              help="Tokenizer for --text: one token per character, or byte-level BPE trained on the text.")
@click.option("--vocab-size", type=int, help="BPE vocabulary size (default 4096).")
@click.option("--model", default="gpt-micro", show_default=True,
              help=f"Model size preset: {', '.join(PRESETS)}.")
@click.option("--n-layer", type=int, help="Override the preset's number of layers.")
@click.option("--n-head", type=int, help="Override the preset's number of attention heads.")
@click.option("--n-embd", type=int, help="Override the preset's embedding width.")
@click.option("--block-size", type=int, help="Context length in tokens (default: 256 for text, 3*digits for addition).")
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="gpt1: post-LayerNorm; gpt2: pre-LayerNorm + final LayerNorm; gpt3: gpt2 with "
                   "alternating dense and locally banded attention (default: gpt3 for the gpt3-* presets, else gpt2).")
@click.option("--attn-window", type=int, default=0, help="gpt3 only: tokens each local layer sees (default block_size/4).")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout probability.")
@click.option("--no-bias", is_flag=True, help="Linear layers and LayerNorms without biases.")
@click.option("--max-iters", type=int, required=True, help="Optimizer steps to train for (in total, when resuming).")
@click.option("--batch-size", type=int, default=TRAIN.batch_size, show_default=True, help="Sequences per optimizer step.")
@click.option("--micro-batch-size", type=int, default=TRAIN.micro_batch_size, help="Split each batch into slices of this size and "
              "accumulate gradients (saves memory; 0 = no split).")
@click.option("--lr", "learning_rate", type=float, default=TRAIN.learning_rate, show_default=True, help="Peak learning rate.")
@click.option("--min-lr", type=float, default=TRAIN.min_lr, show_default=True, help="Learning rate at the end of the cosine decay.")
@click.option("--warmup-iters", type=int, default=TRAIN.warmup_iters, show_default=True, help="Linear warmup steps.")
@click.option("--lr-decay-iters", type=int, default=TRAIN.lr_decay_iters, help="Steps of cosine decay (default: --max-iters).")
@click.option("--weight-decay", type=float, default=TRAIN.weight_decay, show_default=True, help="AdamW weight decay (>= 2-D weights only).")
@click.option("--beta1", type=float, default=TRAIN.beta1, show_default=True, help="AdamW beta1.")
@click.option("--beta2", type=float, default=TRAIN.beta2, show_default=True, help="AdamW beta2.")
@click.option("--grad-clip", type=float, default=TRAIN.grad_clip, show_default=True, help="Clip the gradient norm (0 = off).")
@click.option("--eval-interval", type=int, default=TRAIN.eval_interval, show_default=True, help="Evaluate and save every N steps.")
@click.option("--seed", type=int, default=TRAIN.seed, show_default=True, help="Seed for initialisation and batch sampling.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default=TRAIN.dtype, show_default=True,
              help="auto: bf16 autocast on GPUs that support it, fp16 + grad scaling on older GPUs, fp32 on CPU.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (faster on GPUs, slow to start).")
@click.option("--shard-tokens", type=int, default=65536, show_default=True, help="Tokens per data shard.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(task, text, digits, tokenizer_kind, vocab_size, model, n_layer, n_head, n_embd, block_size, arch,
          attn_window, dropout, no_bias, max_iters, batch_size, micro_batch_size, learning_rate, min_lr,
          warmup_iters, lr_decay_iters, weight_decay, beta1, beta2, grad_clip, eval_interval, seed, device, dtype,
          compile_, shard_tokens, out, resume, overwrite, quiet):
    """Train a GPT on this machine and save it to --out.

    \b
    Examples:
      gptswarm train --task addition --model gpt-nano --max-iters 3000 --out runs/adder
      gptswarm train --text input.txt --model gpt-micro --block-size 64 --max-iters 2000 --out runs/char
    """
    from gptswarm.mingpt_core import jobs

    cfg = TrainConfig(max_iters=max_iters, batch_size=batch_size, micro_batch_size=micro_batch_size,
                      learning_rate=learning_rate, min_lr=min_lr, warmup_iters=warmup_iters,
                      lr_decay_iters=lr_decay_iters, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                      grad_clip=grad_clip, eval_interval=eval_interval, seed=seed, dtype=dtype, compile=compile_)
    overrides = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, arch=arch, attn_window=attn_window,
                     dropout=dropout, bias=not no_bias)
    history = jobs.train(out, task=task, text=text, digits=digits, tokenizer_kind=tokenizer_kind, vocab_size=vocab_size,
                         model=model, block_size=block_size, model_overrides=overrides, train_config=cfg,
                         device=device, resume=resume, overwrite=overwrite, shard_tokens=shard_tokens,
                         progress=not quiet)
    click.echo(f"saved checkpoint to {out} ({json.dumps(history[-1])})")


@cli.command("eval")
@click.argument("directory", type=click.Path())
@task_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def eval_(directory, task, text, as_json, device):
    """Evaluate the checkpoint in DIRECTORY: exact-match accuracy on held-out sums for
    --task addition, validation loss on the last 10% of FILE for --text FILE."""
    from gptswarm.mingpt_core import jobs

    metrics = jobs.evaluate(directory, task=task, text=text, device=device)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    for k, v in metrics.items():
        if v is not None:
            click.echo(f"{k:>15}: {v:.4f}" if isinstance(v, float) else f"{k:>15}: {v}")


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--prompt", required=True, help="Text to continue (every character must be in the tokenizer's vocabulary).")
@click.option("--max-new-tokens", type=int, default=200, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature (< 1: safer, > 1: wilder).")
@click.option("--top-k", type=int, help="Sample only from the K most likely tokens.")
@click.option("--top-p", type=float, help="Sample only from the smallest set of tokens whose probability reaches P.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (deterministic).")
@click.option("--seed", type=int, help="Random seed for sampling.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def sample(directory, prompt, max_new_tokens, temperature, top_k, top_p, greedy, seed, device):
    """Print PROMPT continued by the checkpoint in DIRECTORY."""
    from gptswarm.mingpt_core import jobs

    click.echo(jobs.sample(directory, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, greedy=greedy, seed=seed, device=device))


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="hf: a Hugging Face GPT2LMHeadModel directory (config, safetensors weights, tokenizer).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace a previous export in --out.")
def export(directory, fmt, out, overwrite):
    """Export the checkpoint in DIRECTORY for other tools.

    The Hugging Face export loads with AutoModelForCausalLM.from_pretrained(OUT) and
    AutoTokenizer.from_pretrained(OUT). Only gpt2-architecture models can be exported."""
    from gptswarm.mingpt_core.hf_export import export_hf

    export_hf(directory, out, overwrite)
    click.echo(f"exported {directory} to {out} (Hugging Face GPT2LMHeadModel)")


@cli.command()
@click.option("--model", required=True, type=click.Choice(list(PRESETS)), help="The model preset to plan for.")
@click.option("--vram", type=float, metavar="GIB", help="The GPU memory the worker may use (its --max-vram), in GiB; "
              "without it, the plan of the whole batch at once with AdamW.")
@click.option("--block-size", type=int, default=1024, show_default=True, help="Context length in tokens.")
@click.option("--vocab-size", type=int, default=50257, show_default=True, help="Vocabulary size (GPT-2's BPE: 50257).")
@click.option("--batch-size", type=int, default=TRAIN.batch_size, show_default=True,
              help="Sequences per inner optimizer step (the run's).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="Activations' precision: what the device's autocast uses (float32 on a CPU).")
@click.option("--topk", is_flag=True, help="The run uses top-k compression (the worker keeps its residual).")
def plan(model, vram, block_size, vocab_size, batch_size, dtype, topk):
    """Print the memory a worker needs to train a model, part by part (the training device's and the
    host's), and how it fits under --vram: micro-batch, 8-bit optimizer state, activation
    checkpointing, in that order (gptswarm/mingpt_core/plan.py). A model that does not fit even at
    one sequence at a time is said to, with the largest preset that would."""
    from gptswarm.mingpt_core.model import GPTConfig
    from gptswarm.mingpt_core.plan import GIB, fit, largest_preset

    if min(block_size, vocab_size, batch_size) < 1 or (vram is not None and not vram > 0):
        raise click.BadParameter("--block-size, --vocab-size, --batch-size and --vram must be positive")
    config = GPTConfig.from_preset(model, vocab_size, block_size)
    value_bytes = 4 if dtype == "float32" else 2
    cap = int(vram * GIB) if vram is not None else None
    p = fit(config, batch_size=batch_size, cap=cap, value_bytes=value_bytes, topk=topk, lean=cap is not None)
    for line in p.lines():
        click.echo(line)
    if cap is not None and not p.fits:
        best = largest_preset(vocab_size=vocab_size, block_size=block_size, batch_size=batch_size, cap=cap,
                              value_bytes=value_bytes, topk=topk)
        click.echo(f"{model} does not fit in {vram:g} GiB even one sequence at a time; the largest preset that does: "
                   f"{best or 'none'}")


from gptswarm.coordinator.admin import credits, quarantine, reducer_credential, rollback  # noqa: E402
from gptswarm.coordinator.cli import coordinator  # noqa: E402
from gptswarm.coordinator.reducer_node import reducer  # noqa: E402
from gptswarm.demo import demo  # noqa: E402
from gptswarm.worker.cli import worker  # noqa: E402

for command in (coordinator, worker, reducer, demo, quarantine, rollback, reducer_credential, credits):
    cli.add_command(command)


def main():
    cli(prog_name="gptswarm")


if __name__ == "__main__":
    sys.exit(main())
