"""The key/value cache of diffusion decoding (Fast-dLLM's prefix and dual caches) on transformers' Cache API.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

The model fills it (`model(..., use_cache=True)`, or a cache passed in); the step engine (decoding_llada.py)
creates one per `generate(kv_cache=...)` call and asks it which positions each forward runs (`query_range`).
It sits beside the model rather than in the sampler, so the model needs nothing from the sampler.
"""

import torch

from transformers.cache_utils import Cache, CacheLayerMixin


# Attention backends whose handling of a query range shorter than the keys we have tested with the cache.
CACHE_ATTENTION_BACKENDS = ("eager", "sdpa")


class DiffusionCacheLayer(CacheLayerMixin):
    """One layer's keys/values over the *whole* sequence; a partial forward replaces its own positions.

    Queries cover positions [query_start, query_start + q); the layer writes their keys/values at those
    positions and returns the full-length keys/values, so attention still sees every position.
    """

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.query_start = 0

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.query_start == 0:  # a full pass: keep everything
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        end = self.query_start + key_states.shape[-2]
        self.keys[:, :, self.query_start : end] = key_states  # [B, kv_heads, L, head_dim]
        self.values[:, :, self.query_start : end] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.query_start  # positions before the queries: the default position ids start there

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.query_start == 0 or self.keys is None:
            return query_length, 0
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices], self.values[indices]


class DiffusionCache(Cache):
    """The key/value cache of diffusion decoding (Fast-dLLM's prefix and dual caches) on transformers' Cache API.

    `generate(kv_cache="prefix" | "dual")` creates one, and `model(..., use_cache=True)` returns one filled by a
    full pass. At the first step of every block the model runs the whole sequence and the cache keeps every
    position's keys/values; later steps of the block run only the block and the positions after it (prefix)
    or only the block (dual), replacing those positions' keys/values (`query_range` decides). It also
    remembers which batch rows it holds, so finished rows can leave the batch.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> out = LladaForMaskedDiffusion(config)(torch.tensor([[5, 6, 63, 63]]), use_cache=True)
        >>> type(out.cache).__name__, out.cache.layers[0].keys.shape[-2]
        ('DiffusionCache', 4)
        ```
    """

    def __init__(self, mode: str = "prefix"):
        super().__init__(layer_class_to_replicate=DiffusionCacheLayer)
        self.mode = mode
        self.rows: torch.Tensor | None = None  # batch rows (of x, CFG copies offset by the batch size) held

    def query_range(self, rows: torch.Tensor, window_start: int, block_start: int, block_end: int, refresh: bool,
                    length: int) -> tuple[int, int]:
        """Positions [start, end) the next forward runs for `rows`, with the layers prepared for it.

        A refresh (the first step of a block), a window that starts before the block (masks left in the
        prompt: the cached prefix is still changing) or rows the cache does not hold run the whole sequence
        and refill the cache. Otherwise the block and everything after it run ("prefix"), or the block
        alone ("dual"), against the cached keys/values.
        """
        if refresh or window_start < block_start or not self.holds(rows):
            self.start_refill(rows)
            start, end = 0, length
        else:
            self.keep_rows(rows)
            start, end = block_start, (block_end if self.mode == "dual" else length)
        self.set_query_start(start)
        return start, end

    def start_refill(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def holds(self, rows: torch.Tensor) -> bool:
        """Whether every requested row has cached keys/values."""
        return self.rows is not None and bool(torch.isin(rows, self.rows).all())

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the rows that are no longer decoded (early exit, removed requests)."""
        if self.rows.numel() == rows.numel():
            return
        position = {int(row): index for index, row in enumerate(self.rows.tolist())}
        indices = torch.tensor([position[int(row)] for row in rows], device=rows.device)
        self.batch_select_indices(indices)
        self.rows = rows

    def set_query_start(self, query_start: int) -> None:
        """Where the next forward's queries begin (0 = a full pass that refills the cache)."""
        for layer in self.layers:  # layers created later, during a full pass, start at 0
            layer.query_start = query_start


__all__ = ["CACHE_ATTENTION_BACKENDS", "DiffusionCacheLayer", "DiffusionCache"]
