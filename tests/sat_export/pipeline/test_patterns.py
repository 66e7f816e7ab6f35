"""sat_export.pipeline.patterns: brace patterns expand as the shell expands them, lazily, and match listed paths;
sat_export.pipeline.stores: the timeouts a store gets, with the user's options on top."""
from __future__ import annotations

import itertools

import pytest

from sat_export.options import SourceOptions
from sat_export.pipeline.patterns import Pattern
from sat_export.pipeline.stores import store_options


@pytest.mark.parametrize("text, names", [
    ("s/{000..002}.tar", ["s/000.tar", "s/001.tar", "s/002.tar"]),
    ("{a,b}{1..2}", ["a1", "a2", "b1", "b2"]),
    ("x{a,{b,c}}", ["xa", "xb", "xc"]),
    ("{00001..00000}", ["00001", "00000"]),
    ("{8..11}", ["8", "9", "10", "11"]),
    ("a{x}b{", ["a{x}b{"]),  # not groups: characters of the name
])
def test_braces_make_the_names_the_shell_makes(text, names):
    pattern = Pattern(text)
    assert list(pattern.names()) == names and pattern.count() == len(names)


def test_a_billion_names_are_counted_and_matched_without_being_made():
    pattern = Pattern("/s/{0..999999999}.tar")
    assert pattern.count() == 10**9 and list(itertools.islice(pattern.names(), 2)) == ["/s/0.tar", "/s/1.tar"]
    assert pattern.matches("/s/999999999.tar") and not pattern.matches("/s/1000000000.tar")
    assert not Pattern("/s/{00..10}.tar").matches("/s/5.tar")  # the padding is part of the name
    assert (pattern.root, pattern.depth) == ("/s", 1)


@pytest.mark.parametrize("text, path, matches", [
    ("d/{a,b}*.tar", "d/a7.tar", True), ("d/{a,b}*.tar", "d/c7.tar", False), ("d/{a,b}*.tar", "d/a/7.tar", False),
    ("d/**/x.tar", "d/x.tar", True), ("d/**/x.tar", "d/p/q/x.tar", True), ("d/?.tar", "d/ab.tar", False),
    ("d/[!a]*.tar", "d/b.tar", True), ("d/[!a]*.tar", "d/a.tar", False),
])
def test_globs_and_braces_match_listed_paths(text, path, matches):
    assert Pattern(text).matches(path) is matches


def test_stores_get_timeouts_and_the_users_options_win_key_by_key():
    sources = SourceOptions(connect_timeout=3, read_timeout=7,
                            storage_options={"config_kwargs": {"read_timeout": 99, "max_pool_connections": 4},
                                             "anon": True})
    s3 = store_options("s3", sources)
    assert s3["anon"] is True and s3["config_kwargs"] == {
        "connect_timeout": 3, "read_timeout": 99, "max_pool_connections": 4,
        "retries": {"mode": "standard", "max_attempts": 2}}
    timeout = store_options("https", SourceOptions(connect_timeout=3, read_timeout=7))["client_kwargs"]["timeout"]
    assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (3, 7, None)
    assert store_options("file", sources) == sources.storage_options
