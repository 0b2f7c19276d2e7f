"""Tokenizers, trained locally and saved as one `tokenizer.json` (the `tokenizers` library's
format, which Hugging Face's AutoTokenizer also reads).

- char: one token per character seen in the training text (as minGPT's char-level project).
- bpe:  byte-level BPE (GPT-2's scheme) trained with the `tokenizers` library.
Nothing is downloaded.
"""

import json
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptswarm.errors import UserError

KINDS = ("char", "bpe")
MAX_VOCAB = 65536  # token ids are stored as uint16 in shards
EOT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        model = json.loads(backend.to_str())["model"]["type"]
        self.kind = {"WordLevel": "char", "BPE": "bpe"}.get(model)
        if self.kind is None:
            raise UserError(f"unsupported tokenizer model {model!r}")
        self.stoi = backend.get_vocab()
        self.itos = {i: s for s, i in self.stoi.items()}

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size()

    @classmethod
    def train(cls, text, kind="char", vocab_size=None):
        if kind == "char":
            return cls.train_char(text)
        if kind == "bpe":
            return cls.train_bpe(text, vocab_size or 4096)
        raise UserError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")

    @classmethod
    def train_char(cls, text):
        chars = sorted(set(text))
        tk = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        tk.decoder = decoders.Fuse()  # join characters without spaces
        return cls(tk)

    @classmethod
    def train_bpe(cls, text, vocab_size):
        if not 257 <= vocab_size <= MAX_VOCAB:
            raise UserError(f"BPE vocab_size must be in [257, {MAX_VOCAB}], got {vocab_size}")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # train on chunks of lines so that one huge "sentence" does not dominate memory
        lines = text.splitlines(keepends=True)
        tk.train_from_iterator(("".join(lines[i:i + 1000]) for i in range(0, len(lines), 1000)), trainer)
        return cls(tk)

    def encode(self, text):
        if self.kind == "char":
            try:
                return [self.stoi[c] for c in text]
            except KeyError:
                bad = next(c for c in text if c not in self.stoi)
                raise UserError(
                    f"character {bad!r} (U+{ord(bad):04X}) is not in the tokenizer's vocabulary") from None
        return self.backend.encode(text).ids

    def decode(self, ids):
        if self.kind == "char":
            return "".join(self.itos[int(i)] for i in ids)
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path):
        self.backend.save(str(path))

    def to_str(self):
        return self.backend.to_str()

    @classmethod
    def load(cls, path):
        path = Path(path)
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
