from hypothesis import given, strategies as st

from training.vocab import SPECIALS, Vocab, tokenize


def test_tokenize_lowercases_strips_punctuation_and_caps_length():
    assert tokenize("A dog's ball, RED!  on-the grass.") == ["a", "dogs", "ball", "red", "on", "the", "grass"]
    assert tokenize("one two three four", max_len=2) == ["one", "two"]


def test_build_applies_min_freq_and_orders_by_frequency():
    vocab = Vocab.build([["a", "dog"], ["a", "cat"], ["a", "dog"]], min_freq=2)
    assert vocab.itos == [*SPECIALS, "a", "dog"]
    assert vocab.encode(["a", "cat"]) == [vocab.start, 4, vocab.unk, vocab.end]


@given(st.lists(st.sampled_from(["a", "dog", "runs", "red"]), max_size=12))
def test_encode_decode_round_trip(words):
    vocab = Vocab.build([["a", "dog", "runs", "red"]])
    assert vocab.decode(vocab.encode(words)) == words


def test_decode_stops_at_end_and_drops_specials():
    vocab = Vocab.build([["x", "y"]])
    ids = [vocab.start, vocab.stoi["x"], vocab.pad, vocab.stoi["y"], vocab.end, vocab.stoi["x"]]
    assert vocab.decode(ids) == ["x", "y"]


def test_vocab_must_start_with_specials():
    import pytest
    with pytest.raises(ValueError, match="start with"):
        Vocab(["a", "b"])
