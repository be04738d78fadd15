"""LLaDA configuration.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.
"""

from typing import Any, ClassVar

from transformers.configuration_utils import PreTrainedConfig


# Where each Auto class finds our code inside a saved checkpoint folder (the bundle's flat files).
BUNDLE_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LladaConfig",
    "AutoModel": "modeling_llada.LladaForMaskedDiffusion",
    "AutoModelForMaskedLM": "modeling_llada.LladaForMaskedDiffusion",
    "AutoModelForCausalLM": "modeling_llada.LladaForMaskedDiffusion",
}

# Official GSAI-ML config.json keys (OLMo style) that map one-to-one onto a standard transformers name.
OFFICIAL_KEY_RENAMES = {
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "n_layers": "num_hidden_layers",
    "mlp_hidden_size": "intermediate_size",
    "max_sequence_length": "max_position_embeddings",
    "weight_tying": "tie_word_embeddings",
    "init_std": "initializer_range",
}

# Official keys that select an architecture variant, with the values this implementation supports.
# Any other value is refused: loading it would silently compute a different model.
OFFICIAL_SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "alibi": (False, None),
    "rope": (True,),
    "block_type": ("llama",),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True, None),
    "activation_type": ("silu",),
    "include_bias": (False, None),
    "include_qkv_bias": (False, None),
    "bias_for_layer_norm": (False, None),
    "attention_layer_norm": (False, None),
    "attention_layer_norm_with_affine": (False, True, None),  # only read when attention_layer_norm is on
    "scale_logits": (False, None),
    "input_emb_norm": (False, None),
    "clip_qkv": (None,),
    "residual_dropout": (0, 0.0, None),
    "embedding_dropout": (0, 0.0, None),
    "block_group_size": (1, None),
}

# Official keys that only steer training-time initialisation, device placement or the official code's
# own kernel choice. They do not change the function the model computes, so they are dropped.
OFFICIAL_KEYS_WITHOUT_EFFECT = (
    "alibi_bias_max",  # only read when alibi is on, which is refused
    "init_device",
    "init_fn",
    "init_cutoff_factor",
    "flash_attention",
    "precision",
)


class LladaConfig(PreTrainedConfig):
    r"""Configuration of a LLaDA masked diffusion language model (Llama-style Transformer, no causal mask).

    Uses the standard transformers names, plus `mask_token_id`. It also accepts the official GSAI-ML
    `config.json` keys (`d_model`, `n_heads`, `n_layers`, `mlp_hidden_size`, `embedding_size`,
    `weight_tying`, ...) and LLaDA-V's Llama-style keys, and refuses architecture variants it does not
    implement (ALiBi, no RoPE, non-llama blocks, biases, qk-norm, logit scaling, ...) with a `ValueError`
    naming the key.

    `vocab_size` is the number of rows of the embedding and LM head. Official checkpoints may pad the
    embedding beyond the tokenizer (`embedding_size > vocab_size`); the padded size is used so that the
    logits have the official shape.

    Args:
        vocab_size: rows of the embedding matrix and LM head.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        head_dim, hidden_act, max_position_embeddings, rms_norm_eps, rope_parameters, tie_word_embeddings,
        attention_dropout, initializer_range: as in `LlamaConfig`.
        rope_full_precision: apply the rotary embedding in float32 whatever the model dtype (the official
            LLaDA default). `False` applies it in the model dtype, as Llama does.
        mask_token_id: id of the mask token (LLaDA: 126336).

    Example:
        ```python
        >>> from llada_hf import LladaConfig
        >>> config = LladaConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=128, vocab_size=100,
        ...                      mask_token_id=99)
        >>> config.hidden_size, config.num_hidden_layers
        (64, 2)
        ```
    """

    model_type = "llada"
    default_theta = 500000.0
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    base_model_tp_plan: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan: ClassVar[dict[str, tuple[list[str], list[str]]]] = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    rope_full_precision: bool = True
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    use_cache: bool = False
    mask_token_id: int | None = 126336
    pad_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    eos_token_id: int | list[int] | None = 126081

    def __post_init__(self, **kwargs):
        kwargs = self._absorb_official_keys(kwargs)
        self._check_sizes()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # The checkpoint's own auto_map (official repos point at *their* code) is replaced by ours, so a
        # re-saved checkpoint always runs with the bundle saved next to it.
        kwargs.pop("auto_map", None)
        self.auto_map = dict(BUNDLE_AUTO_MAP)
        super().__post_init__(**kwargs)
        self._check_architecture()

    def _absorb_official_keys(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Translate official GSAI-ML (OLMo-style) keys into standard fields; refuse unsupported variants."""
        for key, supported in OFFICIAL_SUPPORTED_VALUES.items():
            if key in kwargs and kwargs[key] not in supported:
                raise ValueError(
                    f"LladaConfig does not implement `{key}={kwargs[key]!r}` (supported: "
                    f"{', '.join(repr(v) for v in supported)}). This checkpoint is a different architecture; "
                    "loading it would silently compute something else."
                )
            kwargs.pop(key, None)
        mlp_hidden_size_given = kwargs.get("mlp_hidden_size") is not None
        for old, new in OFFICIAL_KEY_RENAMES.items():
            value = kwargs.pop(old, None)
            if value is not None:
                setattr(self, new, value)
        if kwargs.pop("multi_query_attention", None) and self.num_key_value_heads is None:
            self.num_key_value_heads = 1
        mlp_ratio = kwargs.pop("mlp_ratio", None)
        if mlp_ratio is not None and not mlp_hidden_size_given:
            self.intermediate_size = int(mlp_ratio * self.hidden_size)
        embedding_size = kwargs.pop("embedding_size", None)
        if embedding_size is not None:
            if embedding_size < self.vocab_size:
                raise ValueError(
                    f"`embedding_size` ({embedding_size}) is smaller than `vocab_size` ({self.vocab_size}); the "
                    "embedding must have a row for every token."
                )
            self.vocab_size = embedding_size  # rows of the embedding and LM head
        for key in OFFICIAL_KEYS_WITHOUT_EFFECT:
            kwargs.pop(key, None)
        return kwargs

    def _check_sizes(self) -> None:
        """Sizes that cannot build a model, refused here with the field to change (transformers' Llama would fail
        later, or silently round the head size down)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if value is None and name in ("num_key_value_heads", "head_dim"):
                continue  # derived below
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) is not a multiple of `num_attention_heads` "
                f"({self.num_attention_heads}): the head size would be rounded down (transformers' Llama does so "
                "silently). Change one of them, or set `head_dim` explicitly."
            )
        mask = self.mask_token_id
        valid = isinstance(mask, int) and not isinstance(mask, bool) and 0 <= mask < self.vocab_size
        if mask is not None and not valid:
            raise ValueError(f"`mask_token_id` ({mask!r}) must be a token id in [0, vocab_size={self.vocab_size}): "
                             "set it to your tokenizer's mask token id.")

    def _check_architecture(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"LladaConfig supports `hidden_act='silu'` (SwiGLU) only, got {self.hidden_act!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"LladaConfig implements plain rotary embeddings only, got `rope_type={rope_type!r}`.")
        check_pad_is_not_mask(self.pad_token_id, self.mask_token_id)


def check_pad_is_not_mask(pad_token_id: int | None, mask_token_id: int | None) -> None:
    """Padding read as masks would be filled: the one rule, shared by the config, generation and the tooling.

    Example:
        ```python
        >>> from llada_hf.configuration_llada import check_pad_is_not_mask
        >>> check_pad_is_not_mask(126081, 126336)  # LLaDA pads with EOS
        ```
    """
    if mask_token_id is not None and pad_token_id is not None and pad_token_id == mask_token_id:
        raise ValueError(
            f"`pad_token_id` equals `mask_token_id` ({mask_token_id}): padding would be read as masks to fill. "
            "Use a different pad token (LLaDA pads with EOS, 126081)."
        )


def check_token_ids(input_ids, vocab_size: int) -> None:
    """Every id of `input_ids` (a tensor) must be a row of the embedding: the one rule, shared by the model's forward
    and generation (which checks a prompt once, so that its denoising steps need not). One host sync.

    Without it, an id from another tokenizer fails inside the embedding: an `IndexError`, or on a GPU a device-side
    assert that ends the process.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.configuration_llada import check_token_ids
        >>> check_token_ids(torch.tensor([[5, 99]]), vocab_size=100)
        >>> try:
        ...     check_token_ids(torch.tensor([[5, 100]]), vocab_size=100)
        ... except ValueError as error:
        ...     print(str(error).split(". ")[0])
        Token ids must lie in [0, 100) (the embedding's rows); got ids in [5, 100]
        ```
    """
    if input_ids.numel() == 0:
        return
    low, high = (int(bound) for bound in input_ids.aminmax())  # one reduction; the second read waits for nothing
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"Token ids must lie in [0, {vocab_size}) (the embedding's rows); got ids in [{low}, {high}]. Check "
            "that the tokenizer matches the model."
        )


__all__ = ["LladaConfig", "BUNDLE_AUTO_MAP", "check_pad_is_not_mask", "check_token_ids"]
