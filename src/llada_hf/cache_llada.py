"""The key/value cache of diffusion decoding (Fast-dLLM's prefix and dual caches) on transformers' Cache API.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

The model fills it (`model(..., use_cache=True)`, or a cache passed in); the step engine (decoding_llada.py)
creates one per decoding state and asks it which positions each row's forward runs (`query_range`). It holds
the keys/values of some rows of its state (`rows`), so that each row refreshes its own keys when it needs to and
rows of several states can share a forward pass (`gather`, `store`, `write_columns`). It sits beside the model
rather than in the sampler, so the model needs nothing from the sampler.
"""

import torch

from transformers.cache_utils import Cache, CacheLayerMixin


# Attention backends whose handling of a query range shorter than the keys we have tested with the cache.
CACHE_ATTENTION_BACKENDS = ("eager", "sdpa")

LayerStates = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer, each [rows, kv_heads, L, head_dim]


class DiffusionCacheLayer(CacheLayerMixin):
    """One layer's keys/values over the *whole* sequence; a partial forward replaces its own positions.

    Queries cover positions [start, start + q) of each row, where `query_start` is one start for every row (an int;
    0 = a full pass, which keeps everything it computes) or a [rows] tensor of starts, one per row. The layer writes
    the queries' keys/values at those positions and returns the full-length keys/values, so attention still sees
    every position.
    """

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.query_start: int | torch.Tensor = 0

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.query_start
        if isinstance(start, int) and start == 0:  # a full pass: keep everything
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        if isinstance(start, int):
            end = start + key_states.shape[-2]
            self.keys[:, :, start:end] = key_states  # [B, kv_heads, L, head_dim]
            self.values[:, :, start:end] = value_states
            return self.keys, self.values
        positions = start[:, None] + torch.arange(key_states.shape[-2], device=start.device)  # [B, q], per row
        index = positions[:, None, :, None].expand_as(key_states)
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # Positions before the queries: the default position ids start there. With per-row starts there is no one
        # answer, and the caller passes `position_ids`.
        return self.query_start if isinstance(self.query_start, int) else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if isinstance(self.query_start, int) and self.query_start == 0 or self.keys is None:
            return query_length, 0
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices], self.values[indices]


class DiffusionCache(Cache):
    """The key/value cache of diffusion decoding (Fast-dLLM's prefix and dual caches) on transformers' Cache API.

    `generate(kv_cache="prefix" | "dual")` creates one, and `model(..., use_cache=True)` returns one filled by a
    full pass. At the first step of a row's block the model runs the row's whole sequence and the cache keeps every
    position's keys/values; later steps of the block run only the block and the positions after it (prefix) or
    only the block (dual), replacing those positions' keys/values (`query_range` decides, row by row). It remembers
    which rows of its decoding state it holds (`rows`, ascending): rows that refresh are stored again, rows that
    leave are dropped.

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
        self.rows: torch.Tensor | None = None  # the rows (of the decoding state's forward batch) held, ascending

    def query_range(self, rows: torch.Tensor, refresh: torch.Tensor, block_start: torch.Tensor,
                    block_end: torch.Tensor, key_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row ([R] tensors): the positions [start, end) its next forward runs, and whether it reads its cached
        keys. A refresh (the first step of the row's block, or a mask left before the block: the cached prefix is
        still changing) or a row the cache does not hold runs the whole sequence [0, key_end) and is stored again.
        Otherwise the block and everything after it run ("prefix"), or the block alone ("dual"), against the
        cached keys/values; `block_start` may lie earlier, to recompute positions before the block too."""
        cached = ~refresh & self.holds(rows)
        start = torch.where(cached, block_start, 0)
        end = key_end if self.mode == "prefix" else torch.where(cached, block_end, key_end)
        return start, end, cached

    def start_refill(self, rows: torch.Tensor) -> None:
        """The next forward is a full pass over `rows`: it replaces everything held."""
        self.rows = rows

    def holds(self, rows: torch.Tensor) -> torch.Tensor:
        """Per row: whether the cache has its keys/values."""
        if self.rows is None:
            return torch.zeros_like(rows, dtype=torch.bool)
        return torch.isin(rows, self.rows)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (held ones, ascending): the others left, or are about to be stored again."""
        if self.rows is None or self.rows.numel() == rows.numel():
            return
        self.batch_select_indices(self.slots(rows))
        self.rows = rows

    def slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Where held `rows` sit in the layers' batch dimension."""
        return torch.searchsorted(self.rows, rows)

    def reserve(self, width: int) -> None:
        """Room for keys/values up to position `width` (a bounded canvas grows block by block; the new positions are
        zeros until a forward writes them)."""
        for layer in self.layers:
            if layer.keys is not None and layer.keys.shape[-2] < width:
                layer.keys, layer.values = _fit_width(layer.keys, width), _fit_width(layer.values, width)

    def set_query_start(self, query_start: "int | torch.Tensor") -> None:
        """Where the next forward's queries begin: an int for every row (0 = a full pass that refills the cache) or a
        tensor, one start per held row."""
        for layer in self.layers:  # layers created later, during a full pass, start at 0
            layer.query_start = query_start

    # ---- the rows' keys outside a forward: shared passes, refreshes, state changes -------------------------

    def gather(self, rows: torch.Tensor, width: int) -> LayerStates:
        """The keys/values of held `rows` over positions [0, width) (zeros beyond what is held)."""
        slots = self.slots(rows)
        return [(_fit_width(layer.keys[slots], width), _fit_width(layer.values[slots], width))
                for layer in self.layers]

    def store(self, rows: torch.Tensor, states: LayerStates) -> None:
        """A refresh: `rows` (ascending, none of them held) get the keys/values of a full pass."""
        while len(self.layers) < len(states):
            self.layers.append(DiffusionCacheLayer())
        if self.rows is None or self.rows.numel() == 0:
            for layer, (keys, values) in zip(self.layers, states):
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
            self.rows = rows
            return
        merged = torch.cat([self.rows, rows])
        order = merged.argsort()
        for layer, (keys, values) in zip(self.layers, states):
            width = max(layer.keys.shape[-2], keys.shape[-2])
            layer.keys = torch.cat([_fit_width(layer.keys, width), _fit_width(keys, width)])[order]
            layer.values = torch.cat([_fit_width(layer.values, width), _fit_width(values, width)])[order]
        self.rows = merged[order]

    def write_columns(self, rows: torch.Tensor, starts: torch.Tensor, width: int, states: LayerStates) -> None:
        """After a shared pass: positions [start, start + width) of each held row take the pass's keys/values."""
        slots = self.slots(rows)[:, None]
        columns = starts[:, None] + torch.arange(width, device=starts.device)  # [n, width]
        batch = torch.arange(len(rows), device=starts.device)[:, None]
        for layer, (keys, values) in zip(self.layers, states):
            layer.keys[slots, :, columns] = keys[batch, :, columns]
            layer.values[slots, :, columns] = values[batch, :, columns]

    def renumber(self, kept: torch.Tensor) -> None:
        """The decoding state kept only rows `kept` (ascending) and numbered them 0, 1, ...: drop the others' keys."""
        if self.rows is None:
            return
        self.keep_rows(self.rows[torch.isin(self.rows, kept)])
        self.rows = torch.searchsorted(kept, self.rows)

    def shift_columns(self, shift: int) -> None:
        """The sequence gained `shift` positions on the left (or lost -shift): the keys/values move with it."""
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = _shift_width(layer.keys, shift), _shift_width(layer.values, shift)


def _fit_width(states: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, L, head_dim] cut or zero-padded on the right to `width` positions."""
    if states.shape[-2] >= width:
        return states[:, :, :width]
    return torch.nn.functional.pad(states, (0, 0, 0, width - states.shape[-2]))


def _shift_width(states: torch.Tensor, shift: int) -> torch.Tensor:
    """[rows, heads, L, head_dim] with `shift` zero positions added on the left (or -shift removed)."""
    return torch.nn.functional.pad(states, (0, 0, shift, 0)) if shift >= 0 else states[:, :, -shift:]


__all__ = ["CACHE_ATTENTION_BACKENDS", "DiffusionCacheLayer", "DiffusionCache"]
