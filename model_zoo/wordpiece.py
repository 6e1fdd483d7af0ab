"""A WordPiece vocabulary whose content depends on the corpus only.

Hugging Face's `WordPieceTrainer` (tokenizers 0.23) is not deterministic: it numbers the
continuing-subword tokens (`##x`) in hash-map order, and those numbers break ties between merges of
equal count, so two trainings on one corpus give different vocabularies (other tokens and other ids:
huggingface/tokenizers#1794). A tokenizer cached by one run then silently differs from a fresh
user's, and so do the embedding rows each word is initialised with and every number downstream.

This trainer runs the same algorithm (byte-pair merges with the `##` continuing prefix, which is what
`WordPieceTrainer` does) with every tie broken by the tokens' text:

    words  = the pre-tokenized corpus with counts; each word starts as [c1, ##c2, ##c3, ...]
    vocab  = specials, then the sorted initial symbols
    repeat until |vocab| = vocab_size or no word has two symbols left:
        (x, y) = the adjacent pair with the largest count (summed over words), ties: smallest (x, y)
        merge every adjacent (x, y) into x + y without y's prefix; append it to vocab if new

Encoding stays Hugging Face's `models.WordPiece` (greedy longest match first).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence


def _merge(symbols: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_wordpiece(words: Iterable[str], vocab_size: int, specials: Sequence[str] = ("[UNK]",),
                    prefix: str = "##") -> dict[str, int]:
    """token -> id for the pre-tokenized `words` (see the module docstring); ids follow vocab order."""
    counts = Counter(w for w in words if w)
    splits = {w: [w[0]] + [prefix + ch for ch in w[1:]] for w in sorted(counts)}
    vocab = list(specials) + sorted({s for symbols in splits.values() for s in symbols} - set(specials))
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, symbols in splits.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1][len(prefix):]
        splits = {w: _merge(symbols, best, merged) for w, symbols in splits.items()}
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
    return {token: i for i, token in enumerate(vocab)}
