"""The host-memory prefix cache's bookkeeping (no model): bounded in bytes, least recently used
out first, longer prefixes replacing the entries they extend."""

from __future__ import annotations

from dstack.serving.host_cache import HostPrefixCache


def test_best_prefix_leaves_one_token_to_compute() -> None:
    cache = HostPrefixCache(1000)
    cache.put([1, 2, 3, 4, 5], 3, b"a" * 10)
    cache.put([1, 2, 9], 3, b"b" * 10)
    entry, n = cache.best([1, 2, 3, 4, 7, 8])
    assert entry is not None and entry.data == b"a" * 10 and n == 4
    entry, n = cache.best([1, 2, 3, 4, 5])  # the whole prompt cached: its last token is computed
    assert entry is not None and n == 4
    assert cache.best([7, 8]) == (None, 0)
    assert cache.best([1]) == (None, 0)


def test_bounded_in_bytes_least_recently_used_out_first() -> None:
    cache = HostPrefixCache(30)
    cache.put([1, 1], 2, b"x" * 10)
    cache.put([2, 2], 2, b"y" * 10)
    cache.put([3, 3], 2, b"z" * 10)
    assert cache.best([1, 1, 5])[1] == 2  # [1, 1] is now the most recently used
    cache.put([4, 4], 2, b"w" * 10)  # over 30 bytes: [2, 2] goes
    assert cache.bytes == 30 and len(cache) == 3
    assert cache.best([2, 2, 5]) == (None, 0)
    assert cache.best([1, 1, 5])[1] == 2 and cache.best([3, 3, 5])[1] == 2
    cache.put([5, 5], 2, b"v" * 31)  # larger than the whole bound: not kept, nothing evicted
    assert len(cache) == 3 and cache.best([5, 5, 1]) == (None, 0)
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_bounded_in_entries_too() -> None:
    """However small the states, at most `max_entries` are kept (each request's prefix lookup
    compares its prompt with every entry)."""
    cache = HostPrefixCache(1000, max_entries=2)
    cache.put([1, 1], 2, b"x")
    cache.put([2, 2], 2, b"y")
    cache.put([3, 3], 2, b"z")  # [1, 1], the least recently used, goes
    assert len(cache) == 2 and cache.bytes == 2
    assert cache.best([1, 1, 5]) == (None, 0) and cache.best([3, 3, 5])[1] == 2


def test_a_longer_prefix_replaces_the_entries_it_extends() -> None:
    cache = HostPrefixCache(1000)
    cache.put([1, 2], 2, b"a" * 10)
    cache.put([1, 2, 3, 4], 2, b"b" * 20)  # holds [1, 2] too: the old entry is redundant
    assert len(cache) == 1 and cache.bytes == 20
    assert cache.covers([1, 2, 3]) and cache.covers([1, 2, 3, 4]) and not cache.covers([1, 2, 3, 4, 5])
    cache.put([1, 2, 7], 2, b"c" * 10)  # a different continuation is kept beside it
    assert len(cache) == 2


def test_the_host_cache_setting_is_applied_or_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    """`--host-cache-mib` defaults to 512 MiB with one KV stream per sequence and to off with the
    unified layout (it saves per-stream cells); asked for with unified, or out of range, it is refused."""
    import pytest

    from dstack.serving.__main__ import parse_args

    assert parse_args(["--model", "m"]).host_cache_mib == 512
    assert parse_args(["--model", "m", "--host-cache-mib", "0"]).host_cache_mib == 0
    assert parse_args(["--model", "m", "--kv-layout", "unified"]).host_cache_mib == 0
    for argv, message in (
        (["--kv-layout", "unified", "--host-cache-mib", "64"], "per-sequence only"),
        (["--host-cache-mib", "-1"], "must be 0..65536"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", *argv])
        assert message in capsys.readouterr().err
