import torch

from quickdraft.kv import StaticKVCache


def filled_cache(length: int) -> StaticKVCache:
    cache = StaticKVCache(num_layers=2, batch=1, num_kv_heads=1, max_len=16, head_dim=2, dtype=torch.float32)
    values = torch.arange(length, dtype=torch.float32).repeat_interleave(2).view(1, 1, length, 2)
    for layer in range(2):
        cache.write(layer, values + 100 * layer, -values, 0)
    cache.truncate(length)
    return cache


def test_truncate_only_moves_the_length_and_next_write_overwrites():
    cache = filled_cache(8)
    cache.truncate(5)
    assert cache.length == 5
    new = torch.full((1, 1, 1, 2), 42.0)
    cache.write(0, new, new, cache.length)
    keys, _ = cache.read(0, 6)
    assert keys[0, 0, 5].tolist() == [42.0, 42.0]
    assert keys[0, 0, 4].tolist() == [4.0, 4.0]


def test_compact_moves_the_accepted_path_into_consecutive_slots():
    cache = filled_cache(10)
    cache.compact(start=4, keep=[0, 2, 5])  # slots 4, 6, 9 survive as 4, 5, 6
    assert cache.length == 7
    for layer in range(2):
        keys, values = cache.read(layer, 7)
        assert keys[0, 0, :, 0].tolist() == [x + 100 * layer for x in [0, 1, 2, 3, 4, 6, 9]]
        assert values[0, 0, :, 0].tolist() == [-x for x in [0, 1, 2, 3, 4, 6, 9]]


def test_compact_of_a_prefix_copies_nothing():
    cache = filled_cache(10)
    cache.compact(start=2, keep=[0, 1, 2])
    assert cache.length == 5
    assert cache.read(0, 5)[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]


def test_overflow_is_an_error():
    cache = filled_cache(3)
    try:
        cache.write(0, torch.zeros(1, 1, 20, 2), torch.zeros(1, 1, 20, 2), 0)
    except ValueError as error:
        assert "overflow" in str(error)
    else:
        raise AssertionError("expected an overflow error")
