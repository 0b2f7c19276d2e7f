"""Exported checkpoints load in Hugging Face transformers and behave exactly like ours."""

import pytest
import torch

from conftest import run_cli
from gptswarm.errors import UserError
from gptswarm.mingpt_core import checkpoint, jobs
from gptswarm.mingpt_core.hf_export import export_hf
from gptswarm.mingpt_core.trainer import TrainConfig

transformers = pytest.importorskip("transformers")


def trained(tmp_path, text, tokenizer_kind, **model):
    out = tmp_path / f"ck-{tokenizer_kind}"
    jobs.train(out, text=text, tokenizer_kind=tokenizer_kind, vocab_size=400, model="gpt-nano", block_size=48,
               model_overrides=model, device="cpu", progress=False,
               train_config=TrainConfig(max_iters=30, batch_size=8, learning_rate=3e-3, eval_interval=30))
    return out


@pytest.mark.parametrize("tokenizer_kind,bias", [("char", True), ("bpe", True), ("char", False)])
def test_hf_model_matches_ours(tmp_path, small_text, tokenizer_kind, bias):
    ck = trained(tmp_path, small_text, tokenizer_kind, bias=bias)
    hf_dir = tmp_path / "hf"
    r = run_cli("export", ck, "--format", "hf", "--out", hf_dir)
    assert r.returncode == 0, r.stderr

    ours, tok, _ = checkpoint.load(ck)
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert type(hf).__name__ == "GPT2LMHeadModel"

    prompt = "ROMEO:\nWhat light"
    ids = tok.encode(prompt)
    assert hf_tok(prompt)["input_ids"] == ids
    x = torch.randint(0, tok.vocab_size, (3, 48))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
    assert diff <= 1e-4, diff

    n_new = 48 - len(ids)
    r = run_cli("sample", ck, "--prompt", prompt, "--greedy", "--max-new-tokens", n_new, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ours_text = r.stdout[:-1]  # echo's newline
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
    assert hf_tok.decode(gen[0]) == ours_text
    pipe = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    out = pipe(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[0]["generated_text"]
    assert out == ours_text


@pytest.mark.parametrize("arch", ["gpt1", "gpt3"])
def test_variants_hf_cannot_represent_are_refused(tmp_path, small_text, arch):
    ck = trained(tmp_path, small_text, "char", arch=arch)
    with pytest.raises(UserError, match=f"cannot export arch {arch}"):
        export_hf(ck, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
