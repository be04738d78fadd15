"""Diffusion generation for LLaDA: the paper's samplers behind the ordinary `model.generate()`.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

How the file is built, top to bottom:
- *Options*: every diffusion setting is declared once in `DIFFUSION_OPTIONS` (name, default, check,
  help); `DiffusionGenerationConfig`, its `validate()` and the CLI flags come from that table. The config is a
  whitelist: besides those settings it accepts the `GenerationConfig` fields that keep transformers' meaning
  (`HONOURED_FIELDS`) and token ids and bookkeeping (`PASSIVE_FIELDS`); any other field set to a value that
  does something — a field a new transformers release adds included — is refused, with the advice of
  `REFUSED_FIELDS` where it names the diffusion setting to use.
- *`DiffusionGenerationMixin`*: `generate()`, `infill()` and `prepare_decoding()` (settings, prompt checks,
  lengths, plan) on top of the step engine.

What one denoising step does — strategies, plan and schedule, parallel decoding, early exit, the step engine
(`DiffusionDecodingState`, `DiffusionEngine`) — lives in the sibling `decoding_llada.py`, which imports
nothing from this file; the key/value cache lives beside the model, in `cache_llada.py`.
"""

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from transformers.generation.configuration_utils import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList

from .cache_llada import CACHE_ATTENTION_BACKENDS
from .configuration_llada import check_pad_is_not_mask, check_token_ids
from .decoding_llada import (
    REMASKING_STRATEGIES,
    Block,
    DiffusionDecodingState,
    DiffusionGenerationOutput,
    RemaskingStrategy,
    left_pad,
    plan_blocks,
)
from .policy_llada import DecodingPolicy, check_decoding_policy


# --------------------------------------------------------------------------------------------------
# Options: each diffusion setting declared once
# --------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value) -> str | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        return "must be a positive integer"
    return None


def _count(value) -> str | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        return "must be an integer >= 0"
    return None


def _non_negative(value) -> str | None:
    if value is None or not _is_number(value) or not math.isfinite(value) or value < 0:
        return "must be a finite number >= 0"
    return None


def _in_unit_interval(value) -> str | None:
    if value is not None and (not _is_number(value) or not 0 < value <= 1):  # NaN fails the comparison
        return "must lie in (0, 1]"
    return None


def _positive_finite(value) -> str | None:
    if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
        return "must be a finite number > 0"
    return None


def _boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def _is_token_id(value) -> bool:
    """A non-negative int (bool is not an id: `True` would silently mean token 1; a negative id would index from
    the end of the vocabulary)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_id_or_ids(value) -> str | None:
    if value is None or _is_token_id(value):
        return None
    if isinstance(value, (list, tuple)) and all(_is_token_id(v) for v in value):
        return None
    return "must be a token id (an int >= 0) or a list of token ids"


def _one_of(*choices) -> Callable[[Any], str | None]:
    def check(value):
        return None if value in choices else f"must be one of {choices}"

    return check


def _strategy(value) -> str | None:
    if isinstance(value, RemaskingStrategy) or value in REMASKING_STRATEGIES:
        return None
    return f"must be one of {sorted(REMASKING_STRATEGIES)} or a RemaskingStrategy instance"


@dataclass(frozen=True)
class GenerationOption:
    """One diffusion setting: its name, default, check (returns what is wrong, or None), help and CLI type."""

    name: str
    default: Any
    check: Callable[[Any], str | None]
    help: str
    cli_type: type | None = None  # None: not a CLI flag (ids, objects)
    choices: tuple | None = None  # for the CLI flag


KV_CACHE_MODES = (None, "prefix", "dual")
SCORE_DTYPES = (None, "float32", "float64")

# The defaults reproduce the official LLaDA sampler.
DIFFUSION_OPTIONS: tuple[GenerationOption, ...] = (
    GenerationOption("steps", None, _positive_int,
                     "total denoising steps over the answer (default: one per answer token)", int),
    GenerationOption("block_length", None, _positive_int,
                     "semi-autoregressive block size (default: the whole answer, one block)", int),
    GenerationOption("remasking", "low_confidence", _strategy,
                     "how masked candidates are scored: low_confidence, random, margin, entropy", str),
    GenerationOption("cfg_scale", 0.0, _non_negative, "classifier-free guidance scale w (0 = off)", float),
    GenerationOption("logits_eos_inf", False, _boolean, "forbid EOS as a candidate", bool),
    GenerationOption("logits_mask_inf", False, _boolean,
                     "forbid the mask token as a candidate (the official sampler allows it)", bool),
    GenerationOption("confidence_eos_eot_inf", False, _boolean,
                     "commit EOS/EoT candidates only when nothing else is left in the block", bool),
    GenerationOption("score_dtype", None, _one_of(*SCORE_DTYPES),
                     "dtype of the low-confidence score (default: the logits' own, as the official sampler)", str,
                     SCORE_DTYPES[1:]),
    GenerationOption("early_exit", False, _boolean,
                     "stop a row once its answer is decided up to an EOS (the rest is filled with EOS)", bool),
    GenerationOption("stop_token_ids", None, _token_id_or_ids,
                     "once one of these ids is committed, commit only masks before it, end the answer there and fill "
                     "the rest with EOS: the official LLaDA-V stop rule (its demo and evaluation stop at "
                     "`<|eot_id|>`)", None),
    GenerationOption("kv_cache", None, _one_of(*KV_CACHE_MODES),
                     "Fast-dLLM key/value cache: prefix or dual (default: none)", str, KV_CACHE_MODES[1:]),
    GenerationOption("confidence_threshold", None, _in_unit_interval,
                     "parallel decoding: also commit every candidate whose score reaches tau", float),
    GenerationOption("parallel_factor", None, _positive_finite,
                     "parallel decoding: commit the leading run of sorted scores with c_n >= 1 - f / (n + 1)",
                     float),
    GenerationOption("entropy_bound", None, _positive_finite,
                     "parallel decoding (EB-sampler): commit the best candidates while their summed entropy minus "
                     "the largest stays <= bound", float),
    GenerationOption("decoding_policy", None, check_decoding_policy,
                     "a learned unmasking policy (its numbers, or a DecodingPolicy): also commit the masks it calls "
                     "final, and a row's whole block when it calls the block done", None),
    GenerationOption("cache_refresh_interval", None, _positive_int,
                     "with kv_cache: a full pass refreshes the keys every N-th block; at the others a block's "
                     "first step recomputes only the block before it and reuses the rest (default: every block)",
                     int),
    GenerationOption("canvas_tail", None, _count,
                     "run only the block and this many positions after it (a bounded canvas; default: all)", int),
    GenerationOption("allow_beyond_context", False, _boolean,
                     "warn instead of refusing when prompt + answer exceed max_position_embeddings", bool),
    GenerationOption("output_history", False, _boolean,
                     "with return_dict_in_generate, keep the sequence after every step", None),
    GenerationOption("mask_token_id", None, _token_id_or_ids, "the mask token id (default: the model's)", None),
    GenerationOption("eot_token_id", None, _token_id_or_ids, "the end-of-turn token id(s)", None),
)

# Inherited `GenerationConfig` fields that keep transformers' meaning (checked here, used by the sampler).
HONOURED_FIELDS: dict[str, tuple[Callable[[Any], str | None], str]] = {
    "max_new_tokens": (_positive_int, "answer length (masked positions appended to the prompt)"),
    "max_length": (_positive_int, "prompt + answer length; `max_new_tokens` wins when both are given"),
    "min_new_tokens": (_count, "EOS/EoT are not candidates at the first N answer positions"),
    "min_length": (_count, "as `min_new_tokens`, counted with the prompt"),
    "temperature": (_non_negative, "0 = greedy; otherwise candidates are sampled from softmax(logits / T)"),
    "do_sample": (lambda v: None if v is None else _boolean(v),
                  "unset: the temperature decides (official); False: greedy whatever the temperature (warns); "
                  "True: sample, at temperature 1 unless one is set"),
    "top_k": (lambda v: None if v is None or isinstance(v, int) and v >= 0 else "must be an integer >= 0",
              "sampling: keep the k most likely candidates"),
    "top_p": (_in_unit_interval, "sampling: nucleus filtering of the candidates"),
    "min_p": (lambda v: None if v is None or _is_number(v) and 0 <= v <= 1 else "must lie in [0, 1]",
              "sampling: min-p filtering of the candidates"),
    "typical_p": (_in_unit_interval, "sampling: typical filtering of the candidates"),
    "epsilon_cutoff": (lambda v: None if v is None or _is_number(v) and 0 <= v < 1 else "must lie in [0, 1)",
                       "sampling: epsilon filtering of the candidates"),
    "eta_cutoff": (lambda v: None if v is None or _is_number(v) and 0 <= v < 1 else "must lie in [0, 1)",
                   "sampling: eta filtering of the candidates"),
    "suppress_tokens": (lambda v: None if v is None else _token_id_or_ids(v),
                        "these ids are never candidates"),
    "begin_suppress_tokens": (lambda v: None if v is None else _token_id_or_ids(v),
                              "these ids are not candidates at the first answer position"),
    "num_return_sequences": (_positive_int, "answers per prompt (rows repeated; differ only when sampling)"),
    "return_dict_in_generate": (lambda v: None if v is None else _boolean(v),
                                "return a `DiffusionGenerationOutput`"),
    "use_cache": (lambda v: None if v is None else _boolean(v),
                  "False turns the diffusion cache (`kv_cache`) off; True alone changes nothing"),
}

# Inherited fields with no diffusion meaning that old generation_config.json files or transformers users set:
# (value(s) that mean "off", what to use instead). Advice only: every field outside the whitelist
# (`ACCEPTED_FIELDS`) is refused when set, whether this table lists it or not (`UNLISTED_FIELD_ADVICE`).
REFUSED_FIELDS: dict[str, tuple[tuple, str]] = {
    "num_beams": ((1,), "beam search has no diffusion counterpart; use `remasking` and `steps`"),
    "num_beam_groups": ((1,), "beam search has no diffusion counterpart; use `remasking` and `steps`"),
    "diversity_penalty": ((0.0,), "beam search has no diffusion counterpart"),
    "length_penalty": ((1.0,), "beam search has no diffusion counterpart"),
    "early_stopping": ((False,), "use `early_exit=True` to stop a row at its EOS"),
    "repetition_penalty": ((1.0,), "pass a `logits_processor` (it sees the current sequence at every step)"),
    "encoder_repetition_penalty": ((1.0,), "LLaDA has no encoder"),
    "no_repeat_ngram_size": ((0,), "pass a `logits_processor`"),
    "encoder_no_repeat_ngram_size": ((0,), "LLaDA has no encoder"),
    "bad_words_ids": ((), "use `suppress_tokens` for single tokens, or a `logits_processor`"),
    "sequence_bias": ((), "pass a `logits_processor`"),
    "force_words_ids": ((), "constrained beam search has no diffusion counterpart; use `infill`"),
    "constraints": ((), "constrained beam search has no diffusion counterpart; use `infill`"),
    "forced_bos_token_id": ((), "put the BOS token in the prompt"),
    "forced_eos_token_id": ((), "use `infill` with the EOS at the position you want"),
    "exponential_decay_length_penalty": ((), "use `min_new_tokens` or `logits_eos_inf`"),
    "guidance_scale": ((1.0,), "use `cfg_scale` (= guidance_scale - 1)"),
    "penalty_alpha": ((), "contrastive search has no diffusion counterpart"),
    "dola_layers": ((), "DoLa decoding has no diffusion counterpart"),
    "top_h": ((), "use `top_p`, `top_k` or `min_p`"),
    "max_time": ((), "bound the work with `steps`, or pass `stopping_criteria`"),
    "stop_strings": ((), "cut the decoded text yourself (see `truncate_at_eos`), or pass `stopping_criteria`"),
    "output_scores": ((False,), "use `output_history=True` and `return_dict_in_generate=True`"),
    "output_logits": ((False,), "use `output_history=True` and `return_dict_in_generate=True`"),
    "output_attentions": ((False,), "call the model's forward with `output_attentions=True`"),
    "output_hidden_states": ((False,), "call the model's forward with `output_hidden_states=True`"),
    "remove_invalid_values": ((False,), "pass a `logits_processor`"),
    "renormalize_logits": ((False,), "scores are probabilities already"),
    "low_memory": ((False,), "the sampler keeps only the active window's logits already"),
    "cache_implementation": ((), "use `kv_cache='prefix'` or `'dual'`"),
    "cache_config": ((), "use `kv_cache='prefix'` or `'dual'`"),
    "max_cache_len": ((), "the diffusion cache always covers the whole sequence"),
    "prefill_chunk_size": ((), "the diffusion cache always covers the whole sequence"),
    "continuous_batching_config": ((), "use `DiffusionEngine` (rows join and leave between steps)"),
    "watermarking_config": ((), "not implemented for diffusion"),
    "token_healing": ((False,), "not implemented for diffusion"),
    "prompt_lookup_num_tokens": ((), "assisted decoding has no diffusion counterpart"),
    "max_matching_ngram_size": ((), "assisted decoding has no diffusion counterpart"),
    "num_assistant_tokens": ((), "assisted decoding has no diffusion counterpart"),
    "num_assistant_tokens_schedule": ((), "assisted decoding has no diffusion counterpart"),
    "assistant_confidence_threshold": ((), "assisted decoding has no diffusion counterpart"),
    "assistant_lookbehind": ((), "assisted decoding has no diffusion counterpart"),
    "assistant_early_exit": ((), "assisted decoding has no diffusion counterpart"),
    "assistant_ensemble_weight": ((), "assisted decoding has no diffusion counterpart"),
    "target_lookbehind": ((), "assisted decoding has no diffusion counterpart"),
    "is_assistant": ((False,), "assisted decoding has no diffusion counterpart"),
    "speculation_type": ((), "speculative decoding has no diffusion counterpart"),
    "use_mtp": ((False,), "multi-token prediction heads are not part of LLaDA"),
}
# Token ids and bookkeeping: accepted as they are.
PASSIVE_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "compile_config",
                  "disable_compile", "transformers_version", "_from_model_config")

# The whitelist: the only fields a `DiffusionGenerationConfig` may set to something that is not "off".
ACCEPTED_FIELDS = frozenset(
    [option.name for option in DIFFUSION_OPTIONS] + list(HONOURED_FIELDS) + list(PASSIVE_FIELDS)
)
UNLISTED_FIELD_ADVICE = ("generate() does not implement this field; leave it unset (its settings are "
                         "`DiffusionGenerationConfig`'s: the diffusion options and the honoured transformers fields)")


def _refused_field(config: GenerationConfig) -> tuple[str, Any, str] | None:
    """(name, value, what to do instead) of the first field outside the whitelist set to a value that is not "off";
    every attribute counts, so a field that no table lists is refused too."""
    for name, value in vars(config).items():
        if name.startswith("_") or name in ACCEPTED_FIELDS:  # "_": transformers' bookkeeping (hashes, flags)
            continue
        off_values, instead = REFUSED_FIELDS.get(name, ((), UNLISTED_FIELD_ADVICE))
        if not _is_off(value, off_values):
            return name, value, instead
    return None


def _is_off(value, off_values: tuple) -> bool:
    if value is None or (isinstance(value, (list, tuple, dict)) and len(value) == 0):
        return True
    return any(value == off and type(value) is type(off) for off in off_values)


class DiffusionGenerationConfig(GenerationConfig):
    """Parameters of the diffusion sampler, saved in `generation_config.json` next to the model.

    It holds every setting of `DIFFUSION_OPTIONS` (each documented there) beside the `GenerationConfig` fields,
    and is a whitelist: of the inherited fields, those of `HONOURED_FIELDS` keep transformers' meaning
    (max_new_tokens, max_length, temperature, do_sample, top_k, top_p, min_p, suppress_tokens, ...) and token ids
    are read as usual; `validate()` refuses every other field set to a value that is not "off" (num_beams,
    repetition_penalty, ..., and any field a later transformers release adds), naming the diffusion setting to use
    where there is one (`REFUSED_FIELDS`). Nothing is silently ignored.

    Example:
        ```python
        >>> from llada_hf.generation_llada import DiffusionGenerationConfig
        >>> config = DiffusionGenerationConfig(max_new_tokens=64, steps=64, block_length=32, mask_token_id=126336)
        >>> config.block_length, config.remasking
        (32, 'low_confidence')
        >>> try:
        ...     DiffusionGenerationConfig(num_beams=4)
        ... except ValueError as error:
        ...     print(str(error).split(":")[0])
        `num_beams=4` has no meaning for masked diffusion
        ```
    """

    def __init__(self, **kwargs):
        for option in DIFFUSION_OPTIONS:
            setattr(self, option.name, kwargs.pop(option.name, option.default))
        kwargs.setdefault("max_new_tokens", 128)
        kwargs.setdefault("temperature", 0.0)
        # Explicit, so that it is saved: transformers' text-generation pipeline samples (T 0.7) unless the model's
        # generation config says otherwise, and LLaDA's default is greedy.
        kwargs.setdefault("do_sample", bool(kwargs["temperature"]))
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "DiffusionGenerationConfig":
        """Take the token ids from the model config (a vision-language model's text config: `get_text_config()`, or
        the `text_config` of a config dict); everything else keeps the sampler's defaults."""
        if isinstance(model_config, dict):
            text_config = model_config.get("text_config") or model_config
        else:
            text_config = model_config.get_text_config()
        config_dict = text_config if isinstance(text_config, dict) else text_config.to_dict()
        return cls(**_token_ids_of(config_dict))

    def validate(self, strict: bool = False, user_set_attributes=None) -> None:
        """Reject values the sampler cannot run with; each message names the field to change."""
        checks = [(option.name, option.check) for option in DIFFUSION_OPTIONS]
        checks += [(name, check) for name, (check, _) in HONOURED_FIELDS.items()]
        for name, check in checks:
            value = getattr(self, name, None)
            problem = check(value)
            if problem is not None:
                raise ValueError(f"`{name}` {problem}, got {value!r}.")
        refused = _refused_field(self)
        if refused is not None:
            name, value, instead = refused
            raise ValueError(f"`{name}={value!r}` has no meaning for masked diffusion: {instead}.")
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            problem = _token_id_or_ids(getattr(self, name, None))
            if problem is not None:
                raise ValueError(f"`{name}` {problem}, got {getattr(self, name)!r}.")
        if self.do_sample is True and not self.temperature:
            raise ValueError("`do_sample=True` samples the candidates: set `temperature` > 0 (e.g. 1.0).")
        if self.cache_refresh_interval not in (None, 1) and not self.kv_cache:
            raise ValueError("`cache_refresh_interval` spaces the refreshes of the key/value cache: set `kv_cache` "
                             "('prefix' or 'dual') too, or leave the interval unset.")
        check_pad_is_not_mask(self.pad_token_id, self.mask_token_id)

    def to_dict(self) -> dict:
        output = super().to_dict()
        if isinstance(output.get("remasking"), RemaskingStrategy):  # an instance cannot go to JSON
            output["remasking"] = output["remasking"].name
        if isinstance(output.get("decoding_policy"), DecodingPolicy):  # a learned policy's numbers; others: a name
            output["decoding_policy"] = output["decoding_policy"].to_dict()
        return output


# --------------------------------------------------------------------------------------------------
# generate() and infill()
# --------------------------------------------------------------------------------------------------


# LLaDA's tokenizer (mask id 126336) ends a turn with `<|eot_id|>`, id 126348; official config.json files do not
# name it, and `confidence_eos_eot_inf` and the chat stop need it.
LLADA_MASK_TOKEN_ID, LLADA_EOT_TOKEN_ID = 126336, 126348


def _token_ids_of(config_dict: dict) -> dict:
    """The token ids a generation config takes from a model config dict (mask, EOS, pad, BOS, and end of turn:
    the model config's `eot_token_id`, or LLaDA's own when the mask id is LLaDA's)."""
    ids = {key: config_dict[key] for key in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
                                             "eot_token_id") if config_dict.get(key) is not None}
    if "eot_token_id" not in ids and ids.get("mask_token_id") == LLADA_MASK_TOKEN_ID:
        ids["eot_token_id"] = LLADA_EOT_TOKEN_ID
    return ids


def _with_transformers_conventions(config: DiffusionGenerationConfig, kwargs: dict) -> dict:
    """A call's `max_length` and `do_sample` mean what they mean in transformers: `max_length` (prompt + answer)
    decides the answer length unless `max_new_tokens` is given too; `do_sample=True` samples at temperature 1
    unless one is set; `do_sample=False` is greedy (a warning when a temperature was passed with it)."""
    kwargs = dict(kwargs)
    if kwargs.get("max_length") is not None:
        if kwargs.get("max_new_tokens") is None:
            config.max_new_tokens = None  # max_length decides the answer length for this call
        else:
            warnings.warn("Both `max_new_tokens` and `max_length` were given; `max_new_tokens` decides the "
                          "answer length (as in transformers).", UserWarning, stacklevel=5)
    if "do_sample" not in kwargs and (kwargs.get("temperature") or 0) > 0:
        kwargs["do_sample"] = True  # LLaDA's convention: a temperature > 0 samples
    if kwargs.get("do_sample") is True and "temperature" not in kwargs and not config.temperature:
        kwargs["temperature"] = 1.0  # transformers' default sampling temperature
    if kwargs.get("do_sample") is False and (kwargs.get("temperature") or 0) > 0:
        warnings.warn(f"`do_sample=False`: greedy decoding; `temperature={kwargs['temperature']}` is used only "
                      "when sampling. Set `do_sample=True` or drop `temperature`.", UserWarning, stacklevel=5)
    return kwargs


def _check_ids_in_vocabulary(config: DiffusionGenerationConfig, vocab_size: int) -> None:
    """Every token id a call names must be a row of the model's vocabulary; and something must stay a candidate."""
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id", "suppress_tokens",
                 "begin_suppress_tokens"):
        outside = [i for i in _as_id_list(getattr(config, name, None)) if i >= vocab_size]
        if outside:
            raise ValueError(f"`{name}` names id {outside[0]}, outside the model's vocabulary of {vocab_size} "
                             "tokens: use ids of this model's tokenizer.")
    if len(set(_as_id_list(config.suppress_tokens))) >= vocab_size:
        raise ValueError(f"`suppress_tokens` covers all {vocab_size} tokens of the vocabulary: nothing would be left "
                         "to generate. Suppress fewer ids.")


def _as_id_list(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _over_model_settings(model_config: DiffusionGenerationConfig, settings) -> DiffusionGenerationConfig:
    """The model's settings with the values a dict or a plain `GenerationConfig` sets (for a GenerationConfig: the
    fields that differ from transformers' defaults, as transformers merges it); unknown keys are refused."""
    if isinstance(settings, GenerationConfig):
        settings = {key: value for key, value in settings.to_diff_dict().items() if key != "transformers_version"}
    config = copy.deepcopy(model_config)
    unknown = config.update(**settings)
    if unknown:
        raise TypeError(f"`generation_config` has keys that generate() does not know: {sorted(unknown)}. Use the "
                        "names of `DiffusionGenerationConfig` (e.g. `steps`, `block_length`, `remasking`).")
    return config


def _infill_block(x: torch.LongTensor, config: DiffusionGenerationConfig) -> Block:
    """The plan of `infill`: one block over the whole sequence [B, L], in `steps` steps (default and most: one per
    mask of the row that has the most)."""
    most_masks = int((x == config.mask_token_id).sum(1).max())
    if most_masks == 0:
        raise ValueError(f"`input_ids` contains no mask token (id {config.mask_token_id}) to fill.")
    return Block(0, x.shape[1], min(config.steps or most_masks, most_masks))


class DiffusionGenerationMixin:
    """Gives `LladaForMaskedDiffusion` the diffusion `generate()` (and `infill()`, `prepare_decoding()`).

    It never decodes left to right: every call runs the masked-diffusion sampler through the step engine.
    Any model whose forward takes `input_ids | inputs_embeds, attention_mask, cache, logits_to_keep,
    check_input_ids` and returns `.logits` can use it (LLaDA-V does, from `inputs_embeds`).
    """

    generation_config_class = DiffusionGenerationConfig

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             **kwargs):
        """Called by `from_pretrained`: load generation_config.json as a `DiffusionGenerationConfig`."""
        if generation_config is not None:
            self.generation_config = DiffusionGenerationConfig.from_dict(generation_config.to_dict())
            return
        loading = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        try:
            self.generation_config = DiffusionGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **{key: kwargs[key] for key in loading if key in kwargs}
            )
        except OSError:  # no generation_config.json: the defaults, with the token ids of the model config
            self.generation_config = DiffusionGenerationConfig.from_model_config(self.config)
            return
        # Official folders ship a generation_config.json without the mask (and end-of-turn) id: the model config
        # fills what the file leaves unset.
        for key, value in _token_ids_of(self.config.get_text_config().to_dict()).items():
            if getattr(self.generation_config, key, None) is None:
                setattr(self.generation_config, key, value)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | dict | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria=None,
        streamer=None,
        generator: torch.Generator | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> "torch.LongTensor | DiffusionGenerationOutput":
        """Generate an answer by masked diffusion (LLaDA's sampler).

        The algorithm (the numbers match the comments in the code):

        1. Settings: the model's `generation_config`, updated with `generation_config` and `**kwargs`,
           then validated. The sequence is the prompt followed by `max_new_tokens` mask tokens; the
           attention mask is extended with ones. Masks inside the prompt are filled too (infilling).
        2. Plan: the answer is split into blocks of `block_length`, decoded left to right; each block
           gets its share of `steps` (see `plan_blocks`).
        3. Schedule: in each block, every row commits its block's masks over the block's steps, the same
           number each step (see `tokens_per_step`); the first block also commits the prompt's masks.
        4. Each step runs the model once. With `cfg_scale > 0`, a copy in which every prompt position is
           masked runs in the same batch, and the logits become u + (w + 1)(c - u). Logits are computed
           only for the active window: from the first masked position to the end of the block. With
           `kv_cache`, later steps of a block run only part of the sequence (see `DiffusionCache`).
        5. Candidates: `logits_processor`, `suppress_tokens`, `logits_eos_inf`, `logits_mask_inf` and
           `min_new_tokens` shape the logits; when greedy (temperature 0 or `do_sample=False`) the
           candidate is the argmax, otherwise a sample from softmax(logits / T) restricted by
           `top_k`/`top_p`/`min_p`/... (which shape the candidates only, not the scores of step 6).
        6. Scores: the remasking strategy scores each masked candidate (low confidence: the softmax
           probability in the logits' dtype, as the official sampler); decoded positions and positions
           after the block are never chosen; masks before the block (in the prompt) stay eligible.
        7. Commit: per row, the scheduled number of highest-scoring candidates (ties broken as the official
           `torch.topk`); with `confidence_threshold`/`parallel_factor`, more when the model is sure.
        8. Report and stop: streamers get drafts and finished blocks; a row whose answer is decided up to
           an EOS (`early_exit`) or that a stopping criterion ends has its remaining masks filled with EOS
           and takes no more forward passes; generation ends when every row is finished.
        9. Return prompt + answer ([B, L]), or a `DiffusionGenerationOutput` with
           `return_dict_in_generate=True`. Given `inputs_embeds` instead of `input_ids`, only the answer.

        Steps 4-8 are `DiffusionDecodingState.step()`; `generate` builds the state and steps it to the end.
        With the defaults this reproduces the official LLaDA `generate` token for token (same weights,
        same settings, temperature 0), in float32, bfloat16 and float16.

        Args:
            input_ids: [B, P] prompt ids, left-padded for batches of different lengths (a list of lists of
                ids is left-padded for you).
            attention_mask: [B, P], 1 for tokens and 0 for (left) padding.
            generation_config: a `DiffusionGenerationConfig` to use instead of the model's own; a dict or a plain
                `transformers.GenerationConfig` sets the values it names over the model's own (unknown keys are
                refused, as unknown keywords are).
            logits_processor: applied to every masked position's logits at every step.
            stopping_criteria: called after every step with the current sequences (masks included);
                rows it marks as done are finished as by early exit.
            streamer: any streamer with transformers' protocol: `put` gets committed tokens block by block,
                `put_draft(value=...)` (when it has one) the canvas after every step: the answer from the current
                block on, masks included (transformers' `TextDiffusionStreamer` convention). Batch size 1.
            generator: a `torch.Generator` for reproducible sampling.
            inputs_embeds: [B, P, hidden] prompt embeddings instead of `input_ids` (vision-language models).
            kwargs: any `DiffusionGenerationConfig` field (`max_new_tokens`, `steps`, `block_length`,
                `remasking`, `temperature`, `cfg_scale`, ...).

        Example:
            ```python
            >>> import torch
            >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
            >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
            >>> model = LladaForMaskedDiffusion(config).eval()
            >>> out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, steps=8, block_length=4)
            >>> out.shape
            torch.Size([1, 11])
            ```
        """
        state = self.prepare_decoding(
            input_ids, attention_mask, generation_config=generation_config, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, streamer=streamer, generator=generator,
            inputs_embeds=inputs_embeds, infill=False, **kwargs,  # an answer is appended; `infill` is the other mode
        )
        while not state.done:
            state.step()
        return state.output()

    @torch.no_grad()
    def infill(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> "torch.LongTensor | DiffusionGenerationOutput":
        """Fill every mask token in `input_ids` (anywhere in the sequence) by masked diffusion.

        All masks form one block, decoded in `steps` steps (default: one per mask of the longest row);
        other settings are those of `generate`.

        Example:
            ```python
            >>> import torch
            >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
            >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
            >>> model = LladaForMaskedDiffusion(config).eval()
            >>> filled = model.infill(torch.tensor([[5, 63, 7, 63, 9]]))
            >>> bool((filled == 63).any())
            False
            ```
        """
        state = self.prepare_decoding(input_ids, attention_mask, generator=generator, infill=True, steps=steps,
                                      **kwargs)
        while not state.done:
            state.step()
        return state.output()

    def prepare_decoding(
        self,
        input_ids: torch.LongTensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | dict | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria=None,
        streamer=None,
        generator: torch.Generator | None = None,
        inputs_embeds: torch.Tensor | None = None,
        infill: bool = False,
        **kwargs,
    ) -> DiffusionDecodingState:
        """Steps 1-3 of `generate` (settings, sequence, plan): a `DiffusionDecodingState` ready to `step()`.

        Takes the arguments of `generate`. With `infill=True` no answer is appended: the masks already in
        `input_ids` are decoded where they are, as one block over the whole sequence in `steps` steps (default and
        most: one per mask of the longest row), and outputs describe every position (what `infill` does).
        Example: see `DiffusionDecodingState`.
        """
        # 1. Settings and the initial sequence
        config = self._diffusion_config(generation_config, kwargs)
        prompt_embeds = None
        if inputs_embeds is not None:
            if input_ids is not None:
                raise ValueError("Pass the prompt as `input_ids` or as `inputs_embeds`, not both.")
            prompt_embeds, attention_mask = self._check_prompt_embeds(inputs_embeds, attention_mask)
            input_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=self.device)  # no ids
        else:
            input_ids, attention_mask = self._prompt_tensors(input_ids, attention_mask, config)
        repeats = config.num_return_sequences or 1
        if repeats > 1:
            input_ids = input_ids.repeat_interleave(repeats, dim=0)
            attention_mask = attention_mask.repeat_interleave(repeats, dim=0) if attention_mask is not None else None
            prompt_embeds = prompt_embeds.repeat_interleave(repeats, dim=0) if prompt_embeds is not None else None
        prompt_length = input_ids.shape[1]
        answer_length = self._answer_length(config, prompt_length, infill)
        x, attention_mask = self._prepare_sequence(input_ids, attention_mask, config, answer_length,
                                                   embedded=prompt_embeds is not None)
        # 2. Plan (3., the schedule, is made by the state at each block's first step)
        if infill:  # the whole sequence plays the answer's part
            blocks, prompt_length = [_infill_block(x, config)], 0
        else:
            blocks = plan_blocks(prompt_length, answer_length, config.block_length or answer_length,
                                 config.steps or answer_length)
        return DiffusionDecodingState(self, x, attention_mask, prompt_length, blocks, config,
                                      prompt_embeds=prompt_embeds, logits_processor=logits_processor,
                                      stopping_criteria=stopping_criteria, streamer=streamer, generator=generator)

    # ---- 1. settings and inputs ---------------------------------------------------------------

    def _diffusion_config(self, generation_config, kwargs: dict) -> DiffusionGenerationConfig:
        """The call's settings: the model's config (or `generation_config`) updated with `kwargs`, validated."""
        base = generation_config if generation_config is not None else self.generation_config
        if not isinstance(base, (GenerationConfig, dict)):
            raise TypeError(f"`generation_config` must be a GenerationConfig or a dict, got {type(base).__name__}.")
        if not isinstance(base, DiffusionGenerationConfig):
            base = _over_model_settings(self.generation_config, base)
        settings = base.to_dict()
        for name, kind in (("remasking", RemaskingStrategy), ("decoding_policy", DecodingPolicy)):
            if isinstance(getattr(base, name, None), kind):  # objects stay objects (to_dict names them)
                settings[name] = getattr(base, name)
        config = DiffusionGenerationConfig.from_dict(settings)
        kwargs = _with_transformers_conventions(config, kwargs)
        # The model config is the fallback for the token ids (generation_config.json may omit them).
        for key in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, key, None) is None:
                setattr(config, key, getattr(self.config, key, None))
        unused = config.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unexpected arguments: {sorted(unused)}.")
        if config.use_cache is False:
            config.kv_cache = None
        if config.mask_token_id is None:
            raise ValueError(
                "No mask token id: set `mask_token_id` in the model config or pass `mask_token_id=` to generate."
            )
        _check_ids_in_vocabulary(config, self.config.get_text_config().vocab_size)
        backend = self.config._attn_implementation
        if config.kv_cache and backend not in CACHE_ATTENTION_BACKENDS:
            raise ValueError(
                f"`kv_cache={config.kv_cache!r}` runs with attn_implementation in {CACHE_ATTENTION_BACKENDS}; this "
                f"model uses {backend!r}. Load it with `attn_implementation='sdpa'` or pass `kv_cache=None`."
            )
        return config

    def _prompt_tensors(self, input_ids, attention_mask, config):
        """Accept a tensor, or lists of ids (left-padded here); warn about a padded batch without a mask."""
        if input_ids is None:
            raise ValueError("Pass the prompt as `input_ids` ([batch, length] token ids) or as `inputs_embeds`.")
        if isinstance(input_ids, (list, tuple)):
            rows = [list(input_ids)] if all(isinstance(i, int) for i in input_ids) else [list(r) for r in input_ids]
            if not rows or not all(isinstance(i, int) for row in rows for i in row):
                raise TypeError("`input_ids` as a list must hold token ids (a list of ints, or a list of lists).")
            if any(len(row) == 0 for row in rows):
                raise ValueError("A prompt is empty; pass at least one token (e.g. the BOS token).")
            ragged = len({len(row) for row in rows}) > 1
            if ragged and (attention_mask is not None or config.pad_token_id is None):
                raise ValueError("Prompts of different lengths need `pad_token_id` and no `attention_mask` (they "
                                 "are left-padded for you), or pass a padded tensor with its attention mask.")
            input_ids, built_mask = left_pad(rows, config.pad_token_id if ragged else 0)
            attention_mask = built_mask if ragged else attention_mask
            input_ids = input_ids.to(self.device)
            attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"`input_ids` must be a tensor of token ids, got {type(input_ids).__name__}.")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be 2-D [batch, length], got shape {tuple(input_ids.shape)}.")
        if input_ids.shape[1] == 0:
            raise ValueError("The prompt is empty; pass at least one token (e.g. the BOS token).")
        if input_ids.is_floating_point():
            raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.device != self.device:
            raise ValueError(
                f"`input_ids` is on {input_ids.device} but the model is on {self.device}; move it with "
                "`.to(model.device)`."
            )
        # Once per call: every later id is one the sampler commits, so its forwards skip the model's own check.
        check_token_ids(input_ids, self.config.get_text_config().vocab_size)
        if attention_mask is None and config.pad_token_id is not None:
            if input_ids.shape[0] > 1 and bool((input_ids[:, 0] == config.pad_token_id).any()):
                warnings.warn(
                    "The prompts start with pad tokens but no `attention_mask` was given: the padding is read as "
                    "text, so rows differ from the rows alone. Pass the tokenizer's `attention_mask`.",
                    UserWarning, stacklevel=4,
                )
        return input_ids, attention_mask

    def _check_prompt_embeds(self, inputs_embeds, attention_mask):
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
            raise ValueError("`inputs_embeds` must be a [batch, length, hidden] tensor.")
        hidden = self.get_input_embeddings().weight.shape[1]
        if inputs_embeds.shape[2] != hidden or inputs_embeds.shape[1] == 0:
            raise ValueError(f"`inputs_embeds` must be [batch, length > 0, {hidden}], got "
                             f"{tuple(inputs_embeds.shape)}.")
        if inputs_embeds.device != self.device:
            raise ValueError(f"`inputs_embeds` is on {inputs_embeds.device} but the model is on {self.device}; "
                             "move it with `.to(model.device)`.")
        dtype = self.get_input_embeddings().weight.dtype
        if inputs_embeds.dtype != dtype:
            raise TypeError(f"`inputs_embeds` has dtype {inputs_embeds.dtype} but the model computes in {dtype}; "
                            f"cast it with `.to({dtype})`.")
        return inputs_embeds, attention_mask

    def _answer_length(self, config: DiffusionGenerationConfig, prompt_length: int, infill: bool) -> int:
        """The number of masks to append (none when infilling): `max_length`/`min_length` (which count the prompt)
        become answer lengths; refuse, before anything is allocated, a sequence longer than the model's context (or
        warn, with `allow_beyond_context=True`)."""
        if infill:
            self._check_context(config, prompt_length, 0)
            return 0
        if config.max_new_tokens is None:
            if config.max_length is None:
                raise ValueError("Pass `max_new_tokens` (the answer length) or `max_length` (prompt + answer).")
            if config.max_length <= prompt_length:
                raise ValueError(f"`max_length` ({config.max_length}) must exceed the prompt length "
                                 f"({prompt_length}); pass `max_new_tokens` for the answer length instead.")
            config.max_new_tokens = config.max_length - prompt_length
        if config.min_length:
            config.min_new_tokens = max(config.min_new_tokens or 0, config.min_length - prompt_length)
        self._check_context(config, prompt_length, config.max_new_tokens)
        return config.max_new_tokens

    def _check_context(self, config: DiffusionGenerationConfig, prompt_length: int, answer_length: int) -> None:
        total = prompt_length + answer_length
        context = getattr(self.config, "max_position_embeddings", None)
        if context is not None and total > context:
            message = (f"The prompt ({prompt_length} tokens) + `max_new_tokens` ({answer_length}) = {total} "
                       f"positions, more than the model's context (`max_position_embeddings` = {context}).")
            if not config.allow_beyond_context:
                raise ValueError(message + " Shorten the prompt or the answer, or pass `allow_beyond_context=True`.")
            warnings.warn(message + " Going on (`allow_beyond_context=True`).", UserWarning, stacklevel=5)

    def _prepare_sequence(self, input_ids, attention_mask, config, answer_length: int, embedded=False):
        """Check the prompt and append the masked answer: returns x [B, P + G] and its attention mask."""
        batch_size, prompt_length = input_ids.shape
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch_size, prompt_length):
                raise ValueError(
                    f"`attention_mask` must have the shape of the prompt {(batch_size, prompt_length)}, got "
                    f"{tuple(attention_mask.shape)}."
                )
            attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
            if bool((attention_mask.sum(1) == 0).any()):
                raise ValueError("A row of `attention_mask` is all zeros: every prompt needs at least one token.")
            # Left padding only: once a row's tokens start, no zeros may follow.
            if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError(
                    "The batch is right-padded. Diffusion appends the answer after the prompt, so pad on the "
                    "left: `tokenizer.padding_side = 'left'`."
                )
            if not embedded and bool(((input_ids == config.mask_token_id) & (attention_mask == 0)).any()):
                raise ValueError("Padding positions hold the mask token; pad with another token (LLaDA uses EOS).")
            if bool(attention_mask.all()):  # no padding: no mask to build (and check on the host) at every forward
                attention_mask = None
        answer = torch.full((batch_size, answer_length), config.mask_token_id, dtype=torch.long, device=self.device)
        x = torch.cat([input_ids.long(), answer], dim=1)  # [B, P + G]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(answer)], dim=1)
        return x, attention_mask


__all__ = [
    "DIFFUSION_OPTIONS",
    "HONOURED_FIELDS",
    "PASSIVE_FIELDS",
    "REFUSED_FIELDS",
    "ACCEPTED_FIELDS",
    "GenerationOption",
    "DiffusionGenerationConfig",
    "DiffusionGenerationMixin",
]
