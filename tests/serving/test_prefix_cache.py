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
    assert cache.best(prompt, [0, 3, 5], own=[0]) == (3, len(prompt) - 1)
    # a short match elsewhere is not worth a stream copy...
    assert cache.best(system[:3] + [9, 9], [0, 5], own=[0]) == (None, 0)
    # ...but in the request's own slot any prefix counts
    assert cache.best(system[:3] + [9, 9], [5], own=[5]) == (5, 3)
    assert cache.best([42], [3, 5], own=[0]) == (None, 0)
    # of equal prefixes, one the request may take in place wins
    cache.hold(6, system + [1, 2, 3])
    assert cache.best(prompt, [3, 6], own=[5, 6]) == (6, len(prompt) - 1)


def test_parking_prefers_empty_slots_then_least_recently_used():
    cache = PrefixCache()
    cache.hold(1, [1] * 20)
    cache.hold(2, [2] * 20)
    assert cache.parking_slot([1, 2, 3]) == 3
    cache.best([2] * 20 + [5], [1, 2], own=[0])  # touches slot 2
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
    assert cache.best([1, 2, 3, 7], [0, 4], own=[0]) == (4, 3)
    cache.move(0, 4)  # nothing held: the destination's old tokens are gone too
    assert cache.holds(4) == 0


def test_parking_keeps_only_what_is_worth_a_copy():
    cache = PrefixCache(min_reuse=2)
    cache.hold(0, [1, 2, 3, 4, 5], prompt_len=3)  # a prompt of 3 tokens and 2 generated ones
    # keeping 2 tokens cuts 1 prompt token (the same prompt again); keeping 1 cuts 2
    assert cache.prompt_cut(0, 2) == 1 and cache.prompt_cut(0, 1) == 2 and cache.prompt_cut(0, 4) == 0
    assert cache.park_target(0, [0, 1, 2]) == 1  # an empty slot
    cache.hold(1, [7, 7])
    cache.hold(2, [8, 8])
    # every other idle slot holds something used more recently than slot 0: parking would lose that
    assert cache.park_target(0, [0, 1, 2]) is None
    cache.hold(0, [1, 2, 3])
    assert cache.park_target(0, [0, 1, 2]) == 1  # slot 1 is now the least recently used
    cache.hold(3, [9])
    assert cache.park_target(3, [1, 2]) is None  # too short to be reused
    cache.move(0, 4)
    assert cache.prompt_cut(4, 1) == 2 and cache.prompt_cut(0, 0) == 0


def test_tokens_another_slot_holds_are_not_parked_again():
    """Requests that repeat a prompt leave the same tokens in several slots: a copy of tokens
    another idle slot holds (in full, or as the start of longer ones) adds nothing to the cache."""
    cache = PrefixCache(min_reuse=2)
    cache.hold(0, [1, 2, 3, 4])
    cache.hold(1, [5, 6])
    assert cache.park_target(0, [0, 2, 3]) == 2  # nothing else holds 1 2 3 4
    cache.hold(3, [1, 2, 3, 4, 9])
    assert cache.held_elsewhere([1, 2, 3, 4], 0) and not cache.held_elsewhere([1, 2, 3, 4, 5], 0)
    assert not cache.held_elsewhere([1, 2, 3, 4, 9], 3)  # a slot does not count for itself
    assert cache.park_target(0, [0, 2]) is None
    # ...and the slot that holds them counts as just used: it is the last one parking would overwrite
    cache.hold(2, [7, 7])
    assert cache.parking_slot([1, 2, 3]) == 1
