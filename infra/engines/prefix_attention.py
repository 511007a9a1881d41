"""Attention over a shared prompt prefix that is stored once, not once per row.

A batch of few-shot prompts (the `solve` stage: ~540 shared tokens of system prompt and worked
examples, then ~60-100 tokens of question) used to copy the prefix's keys and values into every
row of the KV cache. Each decode step then read those copies once per row and layer: at 32 rows
and 30 layers, about a gigabyte per step in float32, most of a step's time.

Here the prefix's keys and values stay one row (`PrefixLayer.prefix_keys`), and each row's cache
holds only its own columns. Attention is split in two and merged exactly (the log-sum-exp form
of softmax): the scores against the prefix come from one matrix product for all rows and query
heads of a key/value head (the rows become the product's M dimension), the scores against a
row's own columns from the usual batched product; one shared maximum keeps both in range. The
result equals attention over the concatenated columns up to float rounding (the sums are
grouped differently); it is computed in float32 whatever the model's dtype.

`prefix_attention` is registered with transformers as the attention implementation
`evolforge_prefix`. It finds the layers through `active_cache`, set by the engine around its
forward passes; with no prefix (short prompts, or outside the engine) it is transformers' SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "evolforge_prefix"
_active: ContextVar = ContextVar("evolforge_active_cache", default=None)


class Cursor:
    """Where the decode step writes: one column per row (None: append a block, as in prefill)."""

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.length = 0


class PrefixLayer(DynamicLayer):
    """A KV-cache layer with room for `capacity` columns, written in place, and a shared prefix.

    transformers' `DynamicLayer` concatenates every step, copying the whole cache (a quarter of
    the decode time at batch 64). This one allocates once (zeros: unwritten columns are masked,
    but a NaN bit pattern there would still poison the attention sums) and hands attention a
    view of the used columns. In a decode step each row writes its own column
    (`cursor.positions`, absolute), so rows of different lengths need no left padding.

    After `share_prefix(rows)`, the columns written so far (one row: the batch's shared prefix)
    become `prefix_keys`/`prefix_values`, kept once; the per-row storage then starts at column
    `offset` and `keys`/`values` are the rows' own columns only (`prefix_attention` adds the
    prefix). Column numbers (`get_seq_length`, cursor positions) stay absolute.
    """

    def __init__(self, capacity: int, cursor: Cursor):
        super().__init__()
        self.capacity = capacity
        self.cursor = cursor
        self.length = 0
        self.offset = 0
        self.prefix_keys: torch.Tensor | None = None
        self.prefix_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads, _, dim = key_states.shape
        self._keys = key_states.new_zeros((rows, heads, self.capacity, dim))
        self._values = value_states.new_zeros((rows, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self.cursor.positions
        if positions is None:
            end = self.length + key_states.shape[-2]
            if end > self.offset + self._keys.shape[2]:
                raise RuntimeError(f"KV cache full: {end} columns > capacity {self.capacity}")
            start = self.length - self.offset
            self._keys[:, :, start : end - self.offset].copy_(key_states)
            self._values[:, :, start : end - self.offset].copy_(value_states)
        else:
            end = max(self.length, self.cursor.length)
            rows = torch.arange(positions.shape[0])
            self._keys[rows, :, positions - self.offset] = key_states[:, :, 0]
            self._values[rows, :, positions - self.offset] = value_states[:, :, 0]
        self.length = end
        self.keys = self._keys[:, :, : end - self.offset]
        self.values = self._values[:, :, : end - self.offset]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def _reshape(self, select) -> None:
        used = self.length - self.offset
        keys = select(self._keys[:, :, :used])
        values = select(self._values[:, :, :used])
        self._keys = keys.new_zeros((keys.shape[0], *self._keys.shape[1:]))
        self._values = values.new_zeros((values.shape[0], *self._values.shape[1:]))
        self._keys[:, :, :used].copy_(keys)
        self._values[:, :, :used].copy_(values)
        self.keys = self._keys[:, :, :used]
        self.values = self._values[:, :, :used]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._reshape(lambda t: t[indices])

    def expand_batch(self, rows: int) -> None:
        """Copy a one-row cache (a shared prefix) to `rows` rows."""
        if self.is_initialized:
            self._reshape(lambda t: t.expand(rows, -1, -1, -1))

    def share_prefix(self, rows: int) -> None:
        """Keep the columns written so far (one row) as the shared prefix of `rows` rows."""
        if not self.is_initialized or self.offset:
            raise RuntimeError("share_prefix needs a one-row cache holding only the prefix")
        self.prefix_keys = self._keys[:, :, : self.length].clone()
        self.prefix_values = self._values[:, :, : self.length].clone()
        self.offset = self.length
        heads, dim = self._keys.shape[1], self._keys.shape[3]
        room = self.capacity - self.offset
        self._keys = self._keys.new_zeros((rows, heads, room, dim))
        self._values = self._values.new_zeros((rows, heads, room, self._values.shape[3]))
        self.keys = self._keys[:, :, :0]
        self.values = self._values[:, :, :0]


@contextmanager
def active_cache(cache):
    """Make `cache`'s layers visible to `prefix_attention` for the forward passes inside."""
    token = _active.set(cache)
    try:
        yield
    finally:
        _active.reset(token)


def prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of `query` (rows, heads, q, dim) over the shared prefix plus `key`/`value`.

    `attention_mask` is the engine's boolean mask over all columns, prefix included
    (rows, 1, q, prefix + own). Returns (rows, q, heads, dim), as transformers' SDPA does.
    """
    cache = _active.get()
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if layer is None or layer.prefix_keys is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, q_len, dim = query.shape
    kv_heads, prefix = layer.prefix_keys.shape[1], layer.prefix_keys.shape[2]
    group = heads // kv_heads
    own = key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    # Query heads h = kv * group + j share key/value head kv; (j, q) become one axis.
    q = query.float().reshape(rows, kv_heads, group * q_len, dim)
    # Prefix: one product per key/value head for all rows (rows folded into M).
    q_by_head = q.transpose(0, 1).reshape(kv_heads, rows * group * q_len, dim)
    prefix_keys = layer.prefix_keys[0].float()  # (kv_heads, prefix, dim)
    prefix_scores = torch.matmul(q_by_head, prefix_keys.transpose(1, 2)).mul_(scale)
    prefix_scores = prefix_scores.view(kv_heads, rows, group * q_len, prefix).transpose(0, 1)
    # Own columns: the usual batched product, masked.
    own_scores = torch.matmul(q, key.float().transpose(2, 3)).mul_(scale)
    if attention_mask is not None:
        mask = attention_mask[..., prefix : prefix + own]
        mask = mask.unsqueeze(2).expand(rows, 1, group, q_len, own)
        mask = mask.reshape(rows, 1, group * q_len, own)
        if mask.dtype == torch.bool:
            own_scores = own_scores.masked_fill(~mask, float("-inf"))
        else:
            own_scores = own_scores + mask
    # One maximum for both parts; the prefix part is never fully masked, so it is finite.
    top = torch.maximum(
        prefix_scores.amax(dim=-1, keepdim=True), own_scores.amax(dim=-1, keepdim=True)
    )
    prefix_weights = torch.exp(prefix_scores - top)
    own_weights = torch.exp(own_scores - top)
    total = prefix_weights.sum(dim=-1, keepdim=True) + own_weights.sum(dim=-1, keepdim=True)
    prefix_out = torch.matmul(
        prefix_weights.transpose(0, 1).reshape(kv_heads, rows * group * q_len, prefix),
        layer.prefix_values[0].float(),
    ).view(kv_heads, rows, group * q_len, dim)
    out = prefix_out.transpose(0, 1) + torch.matmul(own_weights, value.float())
    out = (out / total).reshape(rows, heads, q_len, dim)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `prefix_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    # Masks the model builds itself (a 2D mask or none) take SDPA's form; the engine passes 4D.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
