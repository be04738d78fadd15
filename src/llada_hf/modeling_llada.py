"""LLaDA: a Llama-style Transformer without the causal mask, used as a masked diffusion language model.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

The module tree and parameter names are Llama's (`model.layers.N.self_attn.q_proj`, ...), so PEFT
targets, gradient checkpointing, `device_map`, attention backends and tensor-parallel plans work as
they do for Llama. The one real difference from Llama: attention is bidirectional
(`is_causal = False` and a bidirectional padding mask).
"""

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward, rotate_half
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_llada import DiffusionCache
from .configuration_llada import LladaConfig, check_token_ids
from .generation_llada import DiffusionGenerationMixin


# Official GSAI-ML parameter names -> ours. `ff_out` names both the per-block down projection and the
# LM head, so the patterns are anchored on `blocks.N.` and on the end of the transformer's own name.
OFFICIAL_CHECKPOINT_RENAMES = [
    WeightRenaming(r"model\.transformer\.wte\.", "model.embed_tokens."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.q_proj\.", r"model.layers.\1.self_attn.q_proj."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.k_proj\.", r"model.layers.\1.self_attn.k_proj."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.v_proj\.", r"model.layers.\1.self_attn.v_proj."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.attn_out\.", r"model.layers.\1.self_attn.o_proj."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.ff_norm\.", r"model.layers.\1.post_attention_layernorm."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.ff_proj\.", r"model.layers.\1.mlp.gate_proj."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.up_proj\.", r"model.layers.\1.mlp.up_proj."),
    WeightRenaming(r"model\.transformer\.blocks\.(\d+)\.ff_out\.", r"model.layers.\1.mlp.down_proj."),
    WeightRenaming(r"model\.transformer\.ln_f\.", "model.norm."),
    WeightRenaming(r"model\.transformer\.ff_out\.", "lm_head."),
]
# Official checkpoints load through transformers' own checkpoint-conversion mechanism (no separate
# conversion step). Registered here, in the bundle, so remote-code loading can use it too.
register_checkpoint_conversion_mapping("llada", OFFICIAL_CHECKPOINT_RENAMES, overwrite=True)


@dataclass
class MaskedDiffusionOutput(ModelOutput):
    """Output of `LladaForMaskedDiffusion.forward`.

    Args:
        loss: mean cross-entropy over the positions whose label is not -100 (returned with `labels`).
        logits: `[batch, positions, vocab]` scores for every kept position.
        cache: the key/value cache, when one was passed or `use_cache=True`.
        hidden_states, attentions: per-layer outputs when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class LladaRotaryEmbedding(nn.Module):
    """Rotary position embedding of the rotate-half kind over the full head dimension."""

    def __init__(self, config: LladaConfig):
        super().__init__()
        self.theta = config.rope_parameters["rope_theta"]
        self.dim = config.head_dim
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)
        self.full_precision = config.rope_full_precision

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))

    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, L, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, head_dim]
        dtype = torch.float32 if self.full_precision else x.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k ([B, heads, L, head_dim]) in the dtype of cos/sin, then return them in their own dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_rot, k_rot = q.to(cos.dtype), k.to(cos.dtype)
    q_embed = q_rot * cos + rotate_half(q_rot) * sin
    k_embed = k_rot * cos + rotate_half(k_rot) * sin
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


class LladaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: LladaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LladaAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention over the whole sequence: no causal mask."""

    def __init__(self, config: LladaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False  # the whole difference from Llama: every position sees every other one

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # [B, L]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, heads, L, head_dim]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, kv_heads, L, head_dim]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # [B, L, heads*head_dim]
        return self.o_proj(attn_output), attn_weights


class LladaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LladaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LladaAttention(config, layer_idx)
        self.mlp = LladaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def check_local_folder(name_or_path) -> None:
    """Raise `FileNotFoundError` for a local path (absolute, `./`, `../`, `~`, or nested) that does not exist.

    Without this, transformers takes a missing folder for a Hub repo id and fails on the id's format.

    Example:
        ```python
        >>> from llada_hf.modeling_llada import check_local_folder
        >>> check_local_folder("GSAI-ML/LLaDA-8B-Instruct")  # a Hub id: left to from_pretrained
        >>> check_local_folder("/no/such/folder")
        Traceback (most recent call last):
        FileNotFoundError: No such folder: '/no/such/folder' (pass a saved model's folder or a Hub id 'owner/name').
        ```
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return
    name = os.fspath(name_or_path)
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"No such folder: {name!r} (pass a saved model's folder or a Hub id 'owner/name')."
        )


class LladaPreTrainedModel(PreTrainedModel):
    config: LladaConfig
    config_class = LladaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LladaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # the vocabulary check (a host sync) is skipped while compiling
    _can_record_outputs = {"hidden_states": LladaDecoderLayer, "attentions": LladaAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LladaRotaryEmbedding):  # a non-persistent buffer: recomputed, never loaded
            init.copy_(module.inv_freq, module.compute_inv_freq())

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint with missing, unexpected or wrongly shaped
        weights is an error: a half-initialised diffusion model produces fluent-looking nonsense."""
        check_local_folder(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {
            key: sorted(str(item) for item in info.get(key) or [])
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        problems = {key: items for key, items in problems.items() if items}
        if problems:
            details = "; ".join(
                f"{key}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}" for key, items in problems.items()
            )
            raise ValueError(
                f"The checkpoint does not match {cls.__name__} ({details}). Check that the config (layers, "
                "heads, tie_word_embeddings) belongs to these weights."
            )
        return (model, info) if want_info else model


class LladaModel(LladaPreTrainedModel):
    """The bidirectional Transformer body: embeddings, decoder layers, final norm."""

    def __init__(self, config: LladaConfig):
        super().__init__(config)
        # No padding_idx: LLaDA pads with EOS, whose embedding must stay trainable and non-zero.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LladaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LladaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        check_input_ids: bool = True,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`check_input_ids=False` skips the check that every id is a row of the embedding (host syncs): for callers
        whose ids are known to be in range, such as the sampler, which checks the prompt once per `generate`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            self._check_input_ids(input_ids, check_range=check_input_ids)
            inputs_embeds = self.embed_tokens(input_ids)  # [B, L, hidden]
        batch_size, length = inputs_embeds.shape[:2]
        if length == 0:
            raise ValueError("The input is empty (sequence length 0); pass at least one token.")
        if use_cache and cache is None:
            cache = DiffusionCache()  # filled by this full pass: every position's keys/values
        # With a cache, queries cover positions [past_length, past_length + length) and keys span kv_length
        # positions: the cache's own answer (a diffusion cache can hold positions after the queries too).
        past_length = cache.get_seq_length() if cache is not None else 0
        kv_length = cache.get_mask_sizes(length, 0)[0] if cache is not None else length
        _check_attention_mask(attention_mask, batch_size, kv_length)

        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]

        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, position_embeddings=position_embeddings, attention_mask=mask, cache=cache, **kwargs
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)

    def _check_input_ids(self, input_ids: torch.LongTensor, check_range: bool = True) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be 2-D [batch, length], got shape {tuple(input_ids.shape)}.")
        if input_ids.is_floating_point():
            raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
        if check_range and not torch.compiler.is_compiling():  # a host sync cannot be compiled
            check_token_ids(input_ids, self.config.vocab_size)


def _check_attention_mask(attention_mask: torch.Tensor | None, batch_size: int, kv_length: int) -> None:
    if attention_mask is None or attention_mask.dim() == 4:  # a prepared 4-D mask is used as given
        return
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, kv_length):
        raise ValueError(
            f"`attention_mask` must have shape [batch, length] = [{batch_size}, {kv_length}] (1 = token, "
            f"0 = padding), got {tuple(attention_mask.shape)}."
        )


class LladaForMaskedDiffusion(DiffusionGenerationMixin, LladaPreTrainedModel):
    """LLaDA with its LM head: predicts the original token at every (masked) position.

    `generate()` runs the diffusion sampler (see `DiffusionGenerationMixin`), never left-to-right decoding.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> model = LladaForMaskedDiffusion(config)
        >>> ids = torch.tensor([[5, 6, 63, 63]])
        >>> model(ids).logits.shape
        torch.Size([1, 4, 64])
        ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LladaConfig):
        super().__init__(config)
        self.model = LladaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MaskedDiffusionOutput:
        """Logits for every position; with `labels`, the mean cross-entropy where `labels != -100`.

        `labels` are *not* shifted: position i is scored against `labels[:, i]` (a masked diffusion model
        predicts the token at its own position). The 1/t weighting of the diffusion loss lives in the
        trainer. `logits_to_keep` (int = last N positions, or a tensor of positions) limits the LM head
        to the positions that are needed, as in transformers' causal LMs. `check_input_ids=False` (passed on to
        the body) skips the check that every id is a row of the embedding; the sampler passes it, having checked
        its prompt once per `generate`.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return masked_diffusion_output(self.lm_head, outputs, logits_to_keep, labels)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Save weights (safetensors, our Llama-style names), config with `auto_map`, and the bundle's code.

        transformers would by default write back the *official* parameter names a checkpoint was loaded
        with (`save_original_format=True`); we pin `False` so every saved folder uses one layout and runs
        with the bundle saved beside it (`trust_remote_code=True`, no `llada_hf` needed).
        """
        super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)
        if kwargs.get("is_main_process", True):
            copy_bundle_files(save_directory)


BUNDLE_FILES = (
    "configuration_llada.py", "modeling_llada.py", "cache_llada.py", "generation_llada.py", "decoding_llada.py",
    "policy_llada.py", "streaming_llada.py",
)
VISION_BUNDLE_FILES = (  # LLaDA-V, on top
    "configuration_llada_v.py", "geometry_llada_v.py", "modeling_llada_v.py", "processing_llada_v.py",
)


def copy_bundle_files(save_directory, names: tuple[str, ...] = BUNDLE_FILES) -> list[str]:
    """Copy the bundle's flat .py files `names` (this file and its siblings) into `save_directory`."""
    here = os.path.dirname(os.path.abspath(__file__))
    copied = []
    for name in names:
        target = os.path.join(save_directory, name)
        shutil.copyfile(os.path.join(here, name), target)
        copied.append(target)
    return copied


__all__ = [
    "LladaPreTrainedModel",
    "LladaModel",
    "LladaForMaskedDiffusion",
    "MaskedDiffusionOutput",
    "BUNDLE_FILES",
    "VISION_BUNDLE_FILES",
    "copy_bundle_files",
]


def masked_token_cross_entropy(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` [B, L, V] against `labels` [B, L] where `labels != -100`, position i against
    `labels[:, i]` (no shift: a masked diffusion model predicts the token at its own position), in float32."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape {tuple(logits.shape[:-1])} (one label per kept position), got "
            f"{tuple(labels.shape)}."
        )
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def masked_diffusion_output(lm_head: nn.Module, outputs, logits_to_keep, labels) -> MaskedDiffusionOutput:
    """The LM head on the kept positions of a body's output (logits [B, kept, vocab]) and, with `labels`, the
    masked-token loss: the end of both the text model's and LLaDA-V's forward."""
    logits = lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
    return MaskedDiffusionOutput(
        loss=masked_token_cross_entropy(logits, labels) if labels is not None else None,
        logits=logits,
        cache=outputs.cache,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
