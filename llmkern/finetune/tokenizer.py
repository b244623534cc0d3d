"""The Text2SQL tokenizer: a small byte-level BPE (Hugging Face ``tokenizers``) trained on the
pretraining corpus and shipped beside the base model as ``tokenizer.json``.

Byte-level, so any text (Korean, a schema never seen) encodes without an unknown token. Merges stay
inside runs of Latin letters or of Hangul; digits, spaces, newlines and punctuation are tokens of
their own. So a word or number reads the same in a question as in the SQL (``city Busan`` and
``city = 'Busan'`` share the token ``Busan``; ``birth_year`` is ``birth _ year``, as the question's
"birth year"), and copying a value from the question into the query is copying its tokens. Three
special tokens come first:

====================  ===========
``PAD`` = 0           padding (never a target)
``BOS`` = 1           start of a sequence
``EOS`` = 2           end of the answer: generation stops here
====================  ===========
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
IGNORE_INDEX = -100
FILENAME = "tokenizer.json"
# pieces that merges never cross: Latin words, Hangul runs, and every other character on its own
_PIECES = r"[A-Za-z]+|[가-힣]+|[^A-Za-z가-힣]"


class TextTokenizer:
    """Encode text to ids and back (``tokenizers.Tokenizer`` inside), with the supervised-pair and
    batching helpers the fine-tuning uses."""

    def __init__(self, tokenizer: Tokenizer):
        for i, name in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(name) != i:
                raise ValueError(f"llmkern.finetune.tokenizer: special token {name!r} must have id {i}, "
                                 f"got {tokenizer.token_to_id(name)}")
        self._tok = tokenizer

    @classmethod
    def load(cls, directory: str | Path) -> "TextTokenizer":
        """The tokenizer saved in ``directory/tokenizer.json``."""
        path = Path(directory) / FILENAME
        if not path.is_file():
            raise ValueError(f"llmkern.finetune.tokenizer: no {FILENAME} in {directory}")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def train(cls, docs: list[str], vocab_size: int) -> "TextTokenizer":
        """A byte-level BPE with at most ``vocab_size`` tokens (specials and the 256 byte symbols
        included) learned from ``docs``, merging only inside the pieces of the module docstring."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(docs, trainer)
        return cls(tok)

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory) / FILENAME))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text``, optionally with ``BOS`` in front and ``EOS`` at the end."""
        return [BOS] * bos + self._tok.encode(text, add_special_tokens=False).ids + [EOS] * eos

    def decode(self, ids) -> str:
        """Text of ``ids`` (a list or 1-D tensor), stopping at the first ``EOS``; special tokens are
        dropped, and a cut multi-byte character becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if EOS in ids:
            ids = ids[:ids.index(EOS)]
        return self._tok.decode([i for i in ids if i >= len(SPECIAL_TOKENS)], skip_special_tokens=True)

    def encode_pair(self, prompt: str, answer: str) -> dict[str, list[int]]:
        """A supervised example: ``input_ids`` = BOS + prompt + answer + EOS; ``labels`` the same ids
        with the BOS and prompt positions set to ``IGNORE_INDEX`` (-100), so only the answer and its
        EOS are learned. Labels are aligned with inputs (the model shifts them)."""
        p = self.encode(prompt, bos=True)
        a = self.encode(answer, eos=True)
        return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}


def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``encode_pair`` items to ``input_ids``/``labels``/``attention_mask``
    tensors of shape ``(B, max_len)``, int64 (pad id ``PAD``, pad label ``IGNORE_INDEX``, mask 0)."""
    n = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), n), PAD, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, item in enumerate(batch):
        k = len(item["input_ids"])
        ids[i, :k] = torch.tensor(item["input_ids"])
        labels[i, :k] = torch.tensor(item["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
