"""Attention over a shared prefix stored once equals attention over the concatenated columns."""

from __future__ import annotations

import pytest
import torch

from infra.engines.prefix_attention import Cursor, PrefixLayer, active_cache, prefix_attention


class _Module:
    layer_idx = 0
    num_key_value_groups = 3
    is_causal = True
    training = False


class _Cache:
    def __init__(self, layer):
        self.layers = [layer]


def _reference(query, keys, values, mask, scale):
    group = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 5])
def test_split_attention_matches_attention_over_all_columns(dtype, q_len):
    generator = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    rows, heads, kv_heads, dim, prefix, own = 4, 9, 3, 16, 37, 11
    cursor = Cursor()
    layer = PrefixLayer(capacity=prefix + own + 4, cursor=cursor)
    prefix_k, prefix_v = randn(1, kv_heads, prefix, dim), randn(1, kv_heads, prefix, dim)
    layer.update(prefix_k, prefix_v)
    layer.share_prefix(rows)
    own_k, own_v = randn(rows, kv_heads, own, dim), randn(rows, kv_heads, own, dim)
    keys, values = layer.update(own_k, own_v)
    assert keys.shape == (rows, kv_heads, own, dim) and layer.get_seq_length() == prefix + own
    query = randn(rows, heads, q_len, dim)
    mask = torch.ones(rows, 1, q_len, prefix + own, dtype=torch.bool)
    mask[1, :, :, prefix + 6 :] = False  # a shorter row: its last own columns are padding
    mask[2, :, 0, prefix + 9 :] = False  # causal-style: the first query sees fewer columns
    with active_cache(_Cache(layer)):
        got, _ = prefix_attention(_Module(), query, keys, values, mask, scaling=dim**-0.5)
    all_keys = torch.cat([prefix_k.expand(rows, -1, -1, -1), own_k], dim=2)
    all_values = torch.cat([prefix_v.expand(rows, -1, -1, -1), own_v], dim=2)
    expected = _reference(query, all_keys, all_values, mask, dim**-0.5)
    assert got.shape == (rows, q_len, heads, dim) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), expected, atol=tolerance, rtol=tolerance)


def test_without_a_prefix_it_is_sdpa():
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 9, 1, 8, generator=generator)
    keys, values = torch.randn(2, 3, 6, 8, generator=generator), torch.randn(2, 3, 6, 8)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    plain, _ = prefix_attention(_Module(), query, keys, values, mask, scaling=0.3)
    expected = _reference(query, keys, values, mask, 0.3)
    assert torch.allclose(plain, expected, atol=1e-6)


def test_prefix_layer_writes_rows_at_absolute_positions_and_drops_rows():
    cursor = Cursor()
    layer = PrefixLayer(capacity=12, cursor=cursor)
    layer.update(torch.ones(1, 2, 4, 3), torch.ones(1, 2, 4, 3))  # prefix: columns 0-3
    layer.share_prefix(3)
    layer.update(torch.zeros(3, 2, 2, 3), torch.zeros(3, 2, 2, 3))  # own block: columns 4-5
    cursor.positions, cursor.length = torch.tensor([6, 5, 6]), 7
    step = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 3)
    keys, _ = layer.update(step + 1, step + 1)
    assert keys.shape == (3, 2, 3, 3) and layer.get_seq_length() == 7
    assert keys[0, 0, 2, 0] == 1 and keys[1, 0, 1, 0] == 2 and keys[2, 0, 2, 0] == 3
    layer.batch_select_indices(torch.tensor([2]))
    assert layer.keys.shape == (1, 2, 3, 3) and layer.keys[0, 0, 2, 0] == 3
    assert layer.prefix_keys.shape == (1, 2, 4, 3)  # the prefix is kept once, whatever the rows
    cursor.positions = None
    with pytest.raises(RuntimeError, match="KV cache full"):
        layer.update(torch.zeros(1, 2, 6, 3), torch.zeros(1, 2, 6, 3))
