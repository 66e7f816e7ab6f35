"""Tokenisation and the vocabulary (stored as a plain list of words in checkpoints and manifests)."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_NON_WORD = re.compile(r"[^a-z0-9]+")


def tokenize(text: str, max_len: int | None = None) -> list[str]:
    """The one tokenisation: lowercase, drop apostrophes, other punctuation to spaces, cut to ``max_len``."""
    words = _NON_WORD.sub(" ", text.lower().replace("'", "")).split()
    return words[:max_len] if max_len else words


class Vocab:
    """Word <-> id. Ids 0..3 are ``<pad> <start> <end> <unk>``."""

    def __init__(self, itos: Sequence[str]):
        """Raises ``ValueError`` for a word that is not a string or not valid UTF-8 (it could not be written
        to a manifest or a row), missing specials or duplicates; words are not echoed."""
        for i, word in enumerate(itos):
            if not isinstance(word, str):
                raise ValueError(f"vocabulary word {i} is a {type(word).__name__}, not a string")
            if not _utf8(word):
                raise ValueError(f"vocabulary word {i} is not valid UTF-8")
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {' '.join(SPECIALS)}")
        if len(set(itos)) != len(itos):
            raise ValueError("vocabulary has duplicate words")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.start, self.end, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_freq: int = 1) -> Vocab:
        """From tokenised captions; words seen fewer than ``min_freq`` times map to ``<unk>``."""
        counts = Counter(w for caption in captions for w in caption)
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Sequence[str]) -> list[int]:
        """``<start> w1 .. wn <end>`` as ids."""
        return [self.start, *(self.stoi.get(w, self.unk) for w in words), self.end]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<end>``, without ``<start>``/``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.start, self.pad):
                words.append(self.itos[i])
        return words

    def special_ids(self) -> dict[str, int]:
        return {"pad": self.pad, "start": self.start, "end": self.end, "unk": self.unk}


def _utf8(word: str) -> bool:
    try:
        word.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. a pickled str decoded with surrogateescape
        return False
    return True
