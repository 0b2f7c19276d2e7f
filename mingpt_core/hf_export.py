"""Export a gptswarm checkpoint as a Hugging Face GPT2LMHeadModel directory.

Our module names are GPT-2's; the difference is that Hugging Face keeps GPT-2's Conv1D layers,
whose weights are the transpose of nn.Linear's. transformers is not needed to write the export.
"""

import json
import os
import shutil
import time
from pathlib import Path

from safetensors.torch import save_file

from gptswarm.errors import UserError
from gptswarm.mingpt_core import checkpoint
from gptswarm.mingpt_core.tokenizer import EOT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
EXPORT_MARK = "gptswarm_export"


def hf_config(c, eos_id):
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # inference export
        "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, EXPORT_MARK: True,
    }


def hf_tensors(model):
    """Our state dict in Hugging Face's layout; bias-free models get zero biases (the same function)."""
    c = model.config
    out = {}
    for k, v in checkpoint.model_tensors(model).items():
        out[k] = v.t().contiguous() if k.endswith(CONV1D) else v
    if not c.bias:
        zeros = lambda n: model.transformer.wte.weight.new_zeros(n).detach().cpu()
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for name, n in (("ln_1", c.n_embd), ("ln_2", c.n_embd), ("attn.c_attn", 3 * c.n_embd),
                            ("attn.c_proj", c.n_embd), ("mlp.c_fc", 4 * c.n_embd), ("mlp.c_proj", c.n_embd)):
                out[p + name + ".bias"] = zeros(n)
        out["transformer.ln_f.bias"] = zeros(c.n_embd)
    return out


def export_hf(directory, out, overwrite=False):
    model, tokenizer, _ = checkpoint.load(directory, "cpu")
    c = model.config
    if c.arch != "gpt2":
        what = {"gpt1": "post-LayerNorm blocks without a final LayerNorm",
                "gpt3": "locally banded sparse attention layers"}[c.arch]
        raise UserError(f"cannot export arch {c.arch} to Hugging Face GPT2LMHeadModel: it has no {what}")
    out = Path(out)
    if out.exists():
        previous = out / "config.json"
        is_export = previous.is_file() and json.loads(previous.read_text()).get(EXPORT_MARK)
        if any(out.iterdir()) and not (overwrite and is_export):
            raise UserError(f"{out} is not empty; choose another --out"
                            + (" or pass --overwrite" if is_export else ""))
    eos_id = tokenizer.stoi.get(EOT)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    try:
        save_file(hf_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(c, eos_id), indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}, indent=1))
        tokenizer.save(tmp / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size,
                   "clean_up_tokenization_spaces": False}
        if eos_id is not None:
            tok_cfg.update(eos_token=EOT, bos_token=EOT, pad_token=EOT)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
        checkpoint.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
