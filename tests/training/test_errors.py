"""How a library's own exception is quoted inside one of our one-line errors."""
from training.errors import clip, first_line


def test_first_line_quotes_the_first_line_cut_short_or_the_type_when_there_is_no_message():
    assert first_line(ValueError("\n  bad graph: node 7\ntraceback of the runtime\n")) == "bad graph: node 7"
    assert first_line(RuntimeError("x" * 500), 160) == "x" * 156 + " ..."
    assert first_line(ValueError()) == "ValueError"  # str(err).splitlines()[0] raised IndexError here


def test_clip_ends_at_a_word_and_says_it_was_cut():
    torch_says = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
                  "internal miniz error. If you are seeing this error, there is a high likelihood that your checkpoint")
    cut = clip(torch_says, 160)
    assert len(cut) <= 160 and cut.endswith(" ...") and torch_says.startswith(cut[:-4])
    assert torch_says[len(cut) - 4] == " "  # the next character of the message was a space: a word ended there
    assert clip("short enough", 160) == "short enough"
