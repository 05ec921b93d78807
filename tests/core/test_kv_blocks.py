from __future__ import annotations

from sloserve.core.kv_blocks import BlockManager
from tests.core.factories import make_request


def computed(blocks: BlockManager, request, n: int) -> None:
    """Pretend the runner computed n more tokens of request."""
    request.num_computed_tokens += n
    blocks.cache_full_blocks(request)


def test_allocate_append_across_block_boundary_and_free():
    blocks = BlockManager(num_blocks=4, block_size=4)
    request = make_request("a", prompt_len=4)
    assert blocks.can_allocate(request, 4)
    blocks.allocate(request, 4)
    assert len(request.block_ids) == 1 and blocks.num_free_blocks == 3
    computed(blocks, request, 4)
    request.output_token_ids.append(9)  # the 5th token starts a second block
    assert blocks.can_append(request, 1)
    blocks.append(request, 1)
    assert len(request.block_ids) == 2 and blocks.usage == 0.5
    blocks.append(request, 1)  # still room in block 2: nothing new
    assert len(request.block_ids) == 2
    blocks.free(request)
    assert request.block_ids == [] and blocks.num_free_blocks == 4


def test_exhaustion_is_reported_without_side_effects():
    blocks = BlockManager(num_blocks=2, block_size=4)
    big = make_request("big", prompt_len=9)
    assert not blocks.can_allocate(big, 9)
    assert blocks.num_free_blocks == 2 and big.block_ids == []
    small = make_request("small", prompt_len=8)
    blocks.allocate(small, 8)
    computed(blocks, small, 8)
    assert not blocks.can_append(small, 1)
    assert blocks.num_used_blocks == 2


def test_prefix_reuse_shares_blocks_and_survives_free():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = make_request("first", prompt_len=10)
    blocks.allocate(first, 10)
    computed(blocks, first, 10)
    second = make_request("second", prompt_len=10)  # same tokens
    assert blocks.num_cached_tokens(second) == 8
    blocks.allocate(second, 2)
    assert second.num_computed_tokens == 8 == second.num_cached_tokens
    assert second.block_ids[:2] == first.block_ids[:2]
    assert blocks.num_used_blocks == 4  # 3 for first, 1 new for second
    blocks.free(first)
    blocks.free(second)
    assert blocks.num_free_blocks == 8
    third = make_request("third", prompt_len=10)
    assert blocks.num_cached_tokens(third) == 8  # freed blocks stay findable
    other = make_request("other", prompt_len=10, first_token=100)
    assert blocks.num_cached_tokens(other) == 0


def test_whole_prompt_hit_still_computes_last_token():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = make_request("first", prompt_len=8)
    blocks.allocate(first, 8)
    computed(blocks, first, 8)
    again = make_request("again", prompt_len=8)
    assert blocks.num_cached_tokens(again) == 4  # the last block holds the last token


def test_revived_cached_blocks_count_against_free_space():
    blocks = BlockManager(num_blocks=3, block_size=4)
    first = make_request("first", prompt_len=9)
    blocks.allocate(first, 9)
    computed(blocks, first, 9)
    blocks.free(first)
    again = make_request("again", prompt_len=13)  # 2 cached + 2 fresh > 3 blocks
    assert not blocks.can_allocate(again, 5)
    fits = make_request("fits", prompt_len=9)
    assert blocks.can_allocate(fits, 1)
