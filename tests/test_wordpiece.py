"""The text tokenizer's vocabulary is a function of the corpus alone (model_zoo/wordpiece.py)."""

from model_zoo.digits import caption_corpus
from model_zoo.vocab import load_or_train_wordpiece
from model_zoo.wordpiece import train_wordpiece


def test_merges_by_count_with_ties_broken_by_text():
    """Hand computation. Words ab x2, abc, bc start as [a ##b], [a ##b ##c], [b ##c]; the alphabet is
    sorted ('#' < 'a'). Pair counts: (a,##b) 3 -> 'ab'; then (ab,##c) 1 and (b,##c) 1 tie and 'ab' < 'b'
    -> 'abc'; then 'bc'; then no pair is left."""
    words = ["ab", "abc", "bc", "ab"]
    expected = ["[UNK]", "##b", "##c", "a", "b", "ab", "abc", "bc"]
    assert train_wordpiece(words, 100) == {t: i for i, t in enumerate(expected)}
    assert train_wordpiece(list(reversed(words)), 100) == train_wordpiece(words, 100), "order of the corpus"
    assert list(train_wordpiece(words, 7)) == expected[:7], "stops at vocab_size"


def test_fresh_caches_hold_the_same_tokenizer(tmp_path):
    """Hugging Face's WordPieceTrainer gave a different vocabulary at nearly every training on this
    corpus (huggingface/tokenizers#1794), so a fresh checkout's numbers differed from the README's."""
    built = {load_or_train_wordpiece(tmp_path / str(i), caption_corpus()).to_str() for i in range(3)}
    assert len(built) == 1
    tok = load_or_train_wordpiece(tmp_path / "0", caption_corpus())
    for text in caption_corpus():  # every word of the corpus is one token (longest match first)
        assert len(tok.encode(text).ids) == len(tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
