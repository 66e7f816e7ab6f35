"""How a library's own exception is quoted inside one of our one-line errors."""
from training.errors import first_line


def test_first_line_quotes_the_first_line_cut_short_or_the_type_when_there_is_no_message():
    assert first_line(ValueError("\n  bad graph: node 7\ntraceback of the runtime\n")) == "bad graph: node 7"
    assert first_line(RuntimeError("x" * 500), 160) == "x" * 160
    assert first_line(ValueError()) == "ValueError"  # str(err).splitlines()[0] raised IndexError here
