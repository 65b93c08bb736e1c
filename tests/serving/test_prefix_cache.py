"""The prefix cache's bookkeeping (which idle slot holds what); the engine test decodes for real."""

import numpy as np

from dstack.serving.prefix_cache import PrefixCache, common_prefix


def test_common_prefix():
    a = np.array([1, 2, 3, 4], dtype=np.int32)
    assert common_prefix(a, np.array([1, 2, 9], dtype=np.int32)) == 2
    assert common_prefix(a, a[:2]) == 2
    assert common_prefix(a, np.array([], dtype=np.int32)) == 0
    assert common_prefix(a, np.array([7], dtype=np.int32)) == 0


def test_best_slot_leaves_one_token_and_needs_min_reuse_elsewhere():
    cache = PrefixCache(min_reuse=4)
    system = list(range(100, 120))
    cache.hold(3, system + [1, 2, 3])
    cache.hold(5, system[:3])
    prompt = system + [1, 2, 3]
    # the whole prompt is cached, but its last token must still be decoded for logits
    assert cache.best(prompt, [0, 3, 5], own=0) == (3, len(prompt) - 1)
    # a short match elsewhere is not worth a stream copy...
    assert cache.best(system[:3] + [9, 9], [0, 5], own=0) == (None, 0)
    # ...but in the request's own slot any prefix counts
    assert cache.best(system[:3] + [9, 9], [5], own=5) == (5, 3)
    assert cache.best([42], [3, 5], own=0) == (None, 0)


def test_parking_prefers_empty_slots_then_least_recently_used():
    cache = PrefixCache()
    cache.hold(1, [1] * 20)
    cache.hold(2, [2] * 20)
    assert cache.parking_slot([1, 2, 3]) == 3
    cache.best([2] * 20 + [5], [1, 2], own=0)  # touches slot 2
    assert cache.parking_slot([1, 2]) == 1
    cache.drop(1)
    assert cache.parking_slot([1, 2]) == 1
    assert cache.holds(2) == 20 and cache.holds(1) == 0
    cache.clear()
    assert cache.parking_slot([]) is None and cache.holds(2) == 0


def test_move_hands_a_slot_s_tokens_to_another():
    cache = PrefixCache(min_reuse=2)
    cache.hold(0, [1, 2, 3])
    cache.hold(4, [9, 9])
    cache.move(0, 4)
    assert cache.holds(0) == 0 and cache.holds(4) == 3
    assert cache.best([1, 2, 3, 7], [0, 4], own=0) == (4, 3)
    cache.move(0, 4)  # nothing held: the destination's old tokens are gone too
    assert cache.holds(4) == 0
