"""Diffusion generation for LLaDA: the paper's samplers behind the ordinary `model.generate()`.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

How the file is built, top to bottom:
- *Options*: every diffusion setting is declared once in `DIFFUSION_OPTIONS` (name, default, check,
  help); `DiffusionGenerationConfig`, its `validate()` and the CLI flags come from that table. The fields
  inherited from `GenerationConfig` are either honoured with transformers' meaning or refused with a
  message naming the diffusion setting to use (`INHERITED_FIELDS`).
- *Strategies*: how the candidates at masked positions are scored (`RemaskingStrategy` objects, registered
  by name: "low_confidence", "random", "margin", "entropy"); the most confident are committed.
- *Plan and schedule*: which positions form each block and how many steps each gets (`plan_blocks`), and
  how many tokens each step commits (`tokens_per_step`).
- *Caches* (Fast-dLLM): `DiffusionCache` keeps every position's keys/values; at the first step of a block
  the model runs the whole sequence, later steps only the block and what follows it ("prefix") or only
  the block ("dual"). The cache decides each forward's query range (`DiffusionCache.query_range`).
- *Parallel decoding*: `confidence_threshold` / `parallel_factor` commit more than the schedule when the
  model is sure; `steps` becomes an upper bound. *Early exit*: a row whose answer is decided up to an EOS
  is filled with EOS and leaves the batch.
- *The step engine*: `DiffusionDecodingState` holds the decoding state of rows added together (sequence
  or prompt embeddings, active rows, commit steps, forwards taken, history, cache) and `step()` runs one
  denoising step for them. `DiffusionEngine` holds many such states, so requests can join at a step
  boundary with their own prompt, settings and plan, and leave (finished or cancelled) without changing
  the other rows' tokens. `generate`, `infill`, LLaDA-V and the server all drive it.
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.configuration_utils import GenerationConfig
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.modeling_outputs import ModelOutput

from .configuration_llada import check_pad_is_not_mask
from .streaming_llada import TextDiffusionStreamer, render_draft


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


def _token_id_or_ids(value) -> str | None:
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return None
    return "must be a token id or a list of token ids"


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

# Inherited fields with no diffusion meaning: (value(s) that mean "off", what to use instead). A field set
# to anything else is refused, never silently ignored.
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


def _is_off(value, off_values: tuple) -> bool:
    if value is None or (isinstance(value, (list, tuple, dict)) and len(value) == 0):
        return True
    return any(value == off and type(value) is type(off) for off in off_values)


class DiffusionGenerationConfig(GenerationConfig):
    """Parameters of the diffusion sampler, saved in `generation_config.json` next to the model.

    It holds every setting of `DIFFUSION_OPTIONS` (steps, block_length, remasking, cfg_scale,
    logits_eos_inf, logits_mask_inf, confidence_eos_eot_inf, score_dtype, early_exit, kv_cache,
    confidence_threshold, parallel_factor, allow_beyond_context, output_history, mask_token_id,
    eot_token_id; each documented there) beside the `GenerationConfig` fields. Inherited fields either keep
    transformers' meaning (`HONOURED_FIELDS`: max_new_tokens, max_length, temperature, do_sample, top_k,
    top_p, min_p, suppress_tokens, ...) or are refused by `validate()` with a message naming the diffusion
    setting to use (`REFUSED_FIELDS`: num_beams, repetition_penalty, ...), so nothing is silently ignored.

    Example:
        ```python
        >>> from llada_hf.generation_llada import DiffusionGenerationConfig
        >>> config = DiffusionGenerationConfig(max_new_tokens=64, steps=64, block_length=32, mask_token_id=126336)
        >>> config.block_length, config.remasking
        (32, 'low_confidence')
        >>> DiffusionGenerationConfig(num_beams=4)
        Traceback (most recent call last):
        ...
        ValueError: `num_beams=4` has no meaning for masked diffusion: beam search has no diffusion counterpart; use `remasking` and `steps`.
        ```
    """

    def __init__(self, **kwargs):
        for option in DIFFUSION_OPTIONS:
            setattr(self, option.name, kwargs.pop(option.name, option.default))
        kwargs.setdefault("max_new_tokens", 128)
        kwargs.setdefault("temperature", 0.0)
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
        ids = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")
        return cls(**{key: config_dict[key] for key in ids if config_dict.get(key) is not None})

    def validate(self, strict: bool = False, user_set_attributes=None) -> None:
        """Reject values the sampler cannot run with; each message names the field to change."""
        checks = [(option.name, option.check) for option in DIFFUSION_OPTIONS]
        checks += [(name, check) for name, (check, _) in HONOURED_FIELDS.items()]
        for name, check in checks:
            value = getattr(self, name, None)
            problem = check(value)
            if problem is not None:
                raise ValueError(f"`{name}` {problem}, got {value!r}.")
        for name, (off_values, instead) in REFUSED_FIELDS.items():
            value = getattr(self, name, None)
            if not _is_off(value, off_values):
                raise ValueError(f"`{name}={value!r}` has no meaning for masked diffusion: {instead}.")
        if self.do_sample is True and not self.temperature:
            raise ValueError("`do_sample=True` samples the candidates: set `temperature` > 0 (e.g. 1.0).")
        check_pad_is_not_mask(self.pad_token_id, self.mask_token_id)

    def to_dict(self) -> dict:
        output = super().to_dict()
        if isinstance(output.get("remasking"), RemaskingStrategy):  # an instance cannot go to JSON
            output["remasking"] = output["remasking"].name
        return output


# --------------------------------------------------------------------------------------------------
# Remasking strategies: score the candidates at masked positions; the highest scores are committed
# --------------------------------------------------------------------------------------------------


class RemaskingStrategy:
    """Scores the candidate tokens of the masked positions of the active window.

    Subclass it and implement `score`; pass an instance as `remasking=` or register it with
    `register_remasking_strategy`. Higher scores are committed first.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.generation_llada import RemaskingStrategy
        >>> class LeftToRight(RemaskingStrategy):
        ...     name = "left_to_right"
        ...     def score(self, logits, candidates, generator=None):
        ...         positions = torch.arange(candidates.shape[1], dtype=torch.float64)
        ...         return (-positions).expand(candidates.shape).clone()  # leftmost first
        >>> LeftToRight().score(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))
        tensor([[-0., -1., -2.]], dtype=torch.float64)
        ```
    """

    name: str = ""

    def score(
        self, logits: torch.Tensor, candidates: torch.LongTensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """logits: [B, W, V] (processed, untempered); candidates: [B, W] -> scores [B, W]."""
        raise NotImplementedError


class LowConfidenceRemasking(RemaskingStrategy):
    """The paper's default: the softmax probability of the candidate, in the logits' dtype as the official
    sampler computes it (so bf16 ties are the official ties; `score_dtype="float64"` opts into more precision)."""

    name = "low_confidence"

    def score(self, logits, candidates, generator=None):
        probs = F.softmax(logits, dim=-1)  # [B, W, V]
        return probs.gather(-1, candidates[..., None]).squeeze(-1)


class RandomRemasking(RemaskingStrategy):
    """The paper's random remasking: a Uniform(0, 1) score per position."""

    name = "random"

    def score(self, logits, candidates, generator=None):
        return torch.rand(candidates.shape, generator=generator, device=candidates.device, dtype=torch.float64)


class MarginRemasking(RemaskingStrategy):
    """Top-1 minus top-2 probability: commit where the model hesitates least between two tokens."""

    name = "margin"

    def score(self, logits, candidates, generator=None):
        top2 = F.softmax(logits.to(torch.float64), dim=-1).topk(2, dim=-1).values  # [B, W, 2]
        return top2[..., 0] - top2[..., 1]


class EntropyRemasking(RemaskingStrategy):
    """Negative entropy of the predicted distribution: commit the most peaked positions first."""

    name = "entropy"

    def score(self, logits, candidates, generator=None):
        log_probs = F.log_softmax(logits.to(torch.float64), dim=-1)
        return (log_probs.exp() * log_probs).nan_to_num().sum(-1)  # -entropy; 0 * -inf counts as 0


REMASKING_STRATEGIES: dict[str, type[RemaskingStrategy]] = {}


def register_remasking_strategy(strategy: type[RemaskingStrategy]) -> type[RemaskingStrategy]:
    """Make a strategy class available by its `name` (usable as a decorator)."""
    REMASKING_STRATEGIES[strategy.name] = strategy
    return strategy


for _strategy_class in (LowConfidenceRemasking, RandomRemasking, MarginRemasking, EntropyRemasking):
    register_remasking_strategy(_strategy_class)


def resolve_strategy(remasking: "str | RemaskingStrategy") -> RemaskingStrategy:
    if isinstance(remasking, RemaskingStrategy):
        return remasking
    if remasking not in REMASKING_STRATEGIES:
        raise ValueError(
            f"Unknown `remasking` strategy {remasking!r}; choose one of {sorted(REMASKING_STRATEGIES)} or pass a "
            "RemaskingStrategy instance."
        )
    return REMASKING_STRATEGIES[remasking]()


# --------------------------------------------------------------------------------------------------
# Plan and schedule
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """Positions [start, end) decoded together, in `steps` steps."""

    start: int
    end: int
    steps: int


def plan_blocks(prompt_length: int, answer_length: int, block_length: int, steps: int) -> list[Block]:
    """Split the answer into blocks and share the steps among them.

    The rule (the official one when the divisions are exact): blocks of `block_length` tokens from the
    start of the answer, the last one shorter if `answer_length` is not a multiple; `steps // blocks`
    steps per block, the first `steps % blocks` blocks one more; a block never gets more steps than it
    has tokens (extra steps would commit nothing).

    Example:
        ```python
        >>> from llada_hf.generation_llada import plan_blocks
        >>> [(b.start, b.end, b.steps) for b in plan_blocks(prompt_length=5, answer_length=10, block_length=4, steps=7)]
        [(5, 9, 3), (9, 13, 2), (13, 15, 2)]
        ```
    """
    starts = range(0, answer_length, block_length)
    if steps < len(starts):
        raise ValueError(
            f"`steps` ({steps}) must be at least the number of blocks ({len(starts)} = ceil(max_new_tokens / "
            "block_length)); raise `steps` or `block_length`."
        )
    base, extra = divmod(steps, len(starts))
    blocks = []
    for index, offset in enumerate(starts):
        size = min(block_length, answer_length - offset)
        block_steps = min(base + (index < extra), size)
        blocks.append(Block(prompt_length + offset, prompt_length + offset + size, block_steps))
    return blocks


def tokens_per_step(num_masked: torch.LongTensor, steps: int) -> torch.LongTensor:
    """How many tokens each step commits, per row: [B] masks over `steps` steps -> [B, steps].

    LLaDA's linear noise schedule commits the same number each step; the remainder goes to the first
    steps (the official rule).

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.generation_llada import tokens_per_step
        >>> tokens_per_step(torch.tensor([10, 3]), 4)
        tensor([[3, 3, 2, 2],
                [1, 1, 1, 0]])
        ```
    """
    base, remainder = num_masked // steps, num_masked % steps
    step_index = torch.arange(steps, device=num_masked.device)
    return base[:, None] + (step_index[None, :] < remainder[:, None]).long()


# --------------------------------------------------------------------------------------------------
# Small pieces shared by generation and the tooling
# --------------------------------------------------------------------------------------------------


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """LLaDA's unsupervised classifier-free guidance: u + (w + 1)(c - u), in the logits' own dtype.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.generation_llada import classifier_free_guidance
        >>> classifier_free_guidance(torch.tensor([2.0]), torch.tensor([1.0]), scale=1.0)
        tensor([3.])
        ```
    """
    return unconditional + (scale + 1) * (conditional - unconditional)


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-pad lists of token ids into (input_ids [B, W], attention_mask [B, W]): diffusion appends the
    answer after the prompt, so padding goes on the left.

    Example:
        ```python
        >>> from llada_hf.generation_llada import left_pad
        >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
        ```
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _id_tensor(ids: list[int], device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def _forbid(logits: torch.Tensor, ids: list[int], positions: torch.Tensor | None = None) -> None:
    """Set the logits of `ids` to -inf in place ([R, W, V]), at every position or where `positions` ([W]) holds."""
    if not ids:
        return
    ids = _id_tensor(ids, logits.device)
    if positions is None:
        logits[..., ids] = float("-inf")
        return
    where = positions.nonzero().squeeze(1)
    if where.numel():
        logits[:, where[:, None], ids[None, :]] = float("-inf")


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class DiffusionGenerationOutput(ModelOutput):
    """What `generate(..., return_dict_in_generate=True)` returns.

    Args:
        sequences: [B, prompt + answer] token ids ([B, answer] when the prompt was given as `inputs_embeds`).
        nfe: number of forward passes run (a CFG step is one pass over a doubled batch).
        tokens_per_forward: [B] answer tokens committed per forward pass the row took part in.
        history: with `output_history=True`, the sequences after every step (a tuple of [B, L] tensors).
        commit_step: [B, answer] the step (0-based, counted over the whole generation) at which each
            answer position was committed; -1 for positions filled by early exit.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    tokens_per_forward: torch.Tensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    commit_step: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------------
# Key/value caches (Fast-dLLM's prefix and dual caches) on transformers' Cache API
# --------------------------------------------------------------------------------------------------

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

    def query_range(self, rows: torch.Tensor, window_start: int, block: Block, refresh: bool,
                    length: int) -> tuple[int, int]:
        """Positions [start, end) the next forward runs for `rows`, with the layers prepared for it.

        A refresh (the first step of a block), a window that starts before the block (masks left in the
        prompt: the cached prefix is still changing) or rows the cache does not hold run the whole sequence
        and refill the cache. Otherwise the block and everything after it run ("prefix"), or the block
        alone ("dual"), against the cached keys/values.
        """
        if refresh or window_start < block.start or not self.holds(rows):
            self.start_refill(rows)
            start, end = 0, length
        else:
            self.keep_rows(rows)
            start, end = block.start, (block.end if self.mode == "dual" else length)
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


# --------------------------------------------------------------------------------------------------
# Candidates, scores and commits (steps 5-7), as plain functions of tensors
# --------------------------------------------------------------------------------------------------


def _candidates(logits: torch.Tensor, config: DiffusionGenerationConfig, generator) -> torch.LongTensor:
    """Argmax when greedy; otherwise a sample from softmax(logits / T), after top-k/top-p/min-p/typical/
    epsilon/eta filtering, by Gumbel-max in float64. Filtering shapes the candidates only, not their scores."""
    if not config.temperature or config.do_sample is False:
        return logits.argmax(-1)
    rows, width, vocab = logits.shape
    flat = logits.reshape(rows * width, vocab).to(torch.float64) / config.temperature
    for warper in _sampling_warpers(config, flat.device):
        flat = warper(None, flat)
    uniform = torch.rand(flat.shape, generator=generator, device=flat.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
    return (flat + gumbel).argmax(-1).reshape(rows, width)


def _sampling_warpers(config: DiffusionGenerationConfig, device: torch.device) -> list:
    warpers = []
    if config.top_k:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    if config.min_p:
        warpers.append(MinPLogitsWarper(config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(config.typical_p))
    if config.epsilon_cutoff:
        warpers.append(EpsilonLogitsWarper(config.epsilon_cutoff))
    if config.eta_cutoff:
        warpers.append(EtaLogitsWarper(config.eta_cutoff, device=device))
    return warpers


def _parallel_count(scores, scheduled, config: DiffusionGenerationConfig, logits=None) -> torch.LongTensor:
    """Tokens to commit per row: the schedule, raised by parallel decoding.

    `confidence_threshold` tau: every eligible score >= tau counts. `parallel_factor` f (Fast-dLLM's rule): with
    scores sorted c1 >= c2 >= ..., the leading run with c_n >= 1 - f / (n + 1) counts. `entropy_bound` gamma
    (the EB-sampler, as in transformers' DiffusionGemma): in the same order, the leading run whose entropies
    H_1..H_n satisfy sum(H) - max(H) <= gamma counts (it needs the `logits`). The schedule is the floor, so a
    block always finishes within its steps, and at least the most confident token is committed.
    """
    count = scheduled
    threshold, factor, bound = config.confidence_threshold, config.parallel_factor, config.entropy_bound
    if threshold is not None:
        count = torch.maximum(count, (scores >= threshold).sum(1))
    if factor is None and bound is None:
        return count.clamp(min=1) if threshold is not None else count
    order = scores.argsort(dim=1, descending=True, stable=True)  # [R, W], the commit order
    if factor is not None:
        ranked = scores.gather(1, order).to(torch.float64)
        n = torch.arange(1, ranked.shape[1] + 1, device=scores.device, dtype=torch.float64)
        count = torch.maximum(count, _leading_run(ranked >= 1 - factor / (n + 1)))
    if bound is not None:
        log_probs = F.log_softmax(logits.to(torch.float64), dim=-1)
        entropy = -(log_probs.exp() * log_probs).nan_to_num().sum(-1).gather(1, order)  # [R, W]
        count = torch.maximum(count, _leading_run(entropy.cumsum(1) - entropy.cummax(1).values <= bound))
    return count.clamp(min=1)


def _leading_run(passes: torch.Tensor) -> torch.LongTensor:
    """[R, W] booleans -> [R] length of each row's leading run of True."""
    return passes.long().cumprod(1).sum(1)


def _top_k_per_row(scores: torch.Tensor, k: torch.LongTensor, eligible: torch.Tensor, offset: int,
                   length: int) -> torch.Tensor:
    """Boolean [R, W]: the k[r] highest scores of each row among its eligible positions.

    Ties are broken exactly as the official sampler breaks them: `torch.topk` with that row's own k, over
    the whole sequence (the window sits at `offset` among -inf), in the scores' own dtype. (topk with a
    larger k does not pick the same tied positions, so rows are grouped by k.)
    """
    rows, width = scores.shape
    k = torch.minimum(k, eligible.sum(1))
    confidence = scores.new_full((rows, length), float("-inf"))  # [R, L]
    confidence[:, offset : offset + width] = scores
    chosen = torch.zeros(rows, length, dtype=torch.bool, device=scores.device)
    for value in k.unique().tolist():
        if value == 0:
            continue
        group = (k == value).nonzero().squeeze(1)
        top = confidence[group].topk(value, dim=1).indices  # [G, value]
        chosen[group[:, None], top] = True
    return chosen[:, offset : offset + width] & eligible


# --------------------------------------------------------------------------------------------------
# The step engine
# --------------------------------------------------------------------------------------------------


@dataclass
class ForwardRequest:
    """What one step of a `DiffusionDecodingState` asks of the model: `inputs` (`input_ids` or `inputs_embeds`,
    [N, query positions]) for its active `rows` (N = 2R with CFG: the unconditional copies follow), their key
    `attention_mask` ([N, L] or None), and the window [window_start, window_end) whose logits it needs; the
    queries start at `query_start` (0 unless a cache serves the positions before)."""

    rows: torch.LongTensor
    window_start: int
    window_end: int
    query_start: int
    inputs: dict
    attention_mask: torch.Tensor | None


class DiffusionDecodingState:
    """The decoding state of rows that were added together, and `step()`, one denoising step for them.

    The rows share a length, a block plan and settings, so each step is one forward pass (two rows per row
    with CFG). Build one with `model.prepare_decoding(...)` (it takes `generate`'s arguments), then call
    `step()` until `done`; `output()` gives what `generate` returns. Rows leave when they finish (early exit,
    stopping criteria) or when `remove(rows)` cancels them; the other rows' tokens do not change.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> model = LladaForMaskedDiffusion(config).eval()
        >>> state = model.prepare_decoding(torch.tensor([[5, 6, 7]]), max_new_tokens=8, steps=8, block_length=4)
        >>> while not state.done:
        ...     finished = state.step()
        >>> state.nfe, torch.equal(state.output(), model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8,
        ...                                                            steps=8, block_length=4))
        (8, True)
        ```
    """

    def __init__(
        self,
        model,
        x: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        prompt_length: int,
        blocks: list[Block],
        config: DiffusionGenerationConfig,
        prompt_embeds: torch.Tensor | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria=None,
        streamer=None,
        generator: torch.Generator | None = None,
    ):
        self.model = model
        self.config = config
        self.strategy = resolve_strategy(config.remasking)
        self.x = x  # [B, L] token ids; with prompt_embeds the prompt positions hold -1 (no id)
        self.attention_mask = attention_mask  # [B, L] or None
        self.prompt_embeds = prompt_embeds  # [B, P, D] or None
        self.prompt_length = prompt_length
        self.blocks = blocks
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.streamer = streamer
        self.generator = generator
        self.mask_id = config.mask_token_id
        self.prompt_positions = x != self.mask_id  # CFG masks these in its unconditional copy
        self.active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)  # rows still being decoded
        self.removed = torch.zeros_like(self.active)
        self.commit_step = torch.full_like(x, -1)
        self.forwards_taken = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.cache = DiffusionCache(config.kv_cache) if config.kv_cache else None
        self.history: list[torch.LongTensor] = []
        self.nfe = 0
        self.steps_taken = 0
        self.block_index, self.block_step, self.schedule = 0, 0, None
        self.done = False
        if streamer is not None:  # an embedded prompt has no ids: an empty prompt keeps skip_prompt in step
            streamer.put(self.visible(x)[:, :0] if prompt_embeds is not None else x[:, :prompt_length].cpu())
        self._advance()

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> torch.LongTensor:
        """Run one denoising step (steps 4-8 of `generate`) for the active rows; return the rows it finished."""
        request = self.plan_forward()
        return self.finish_step(request, self.run_forward(request))

    def plan_forward(self) -> "ForwardRequest":
        """Step 4, before the model runs: the active rows, their window, the positions the forward covers (the
        cache decides) and the model inputs. `DiffusionEngine` may run several states' requests as one forward."""
        if self.done:
            raise RuntimeError("This decoding state is done; read `output()` or start a new one.")
        block = self.blocks[self.block_index]
        rows = self.active.nonzero().squeeze(1)
        window_start = int((self.x[rows, : block.end] == self.mask_id).any(0).nonzero()[0])  # first mask of any row
        guided = self.config.cfg_scale > 0
        length = self.x.shape[1]
        if self.config.canvas_tail is not None:  # a bounded canvas: masks far beyond the block are left out
            length = min(length, block.end + self.config.canvas_tail)
        batch_rows = torch.cat([rows, rows + self.x.shape[0]]) if guided else rows  # CFG copies: rows of their own
        start, end = 0, length
        if self.cache is not None:
            start, end = self.cache.query_range(batch_rows, window_start=window_start, block=block,
                                                refresh=self.block_step == 0, length=length)
        mask = self.attention_mask[rows, :length] if self.attention_mask is not None else None
        if guided and mask is not None:
            mask = torch.cat([mask, mask])
        return ForwardRequest(rows=rows, window_start=window_start, window_end=block.end, query_start=start,
                              inputs=self._model_inputs(rows, start, end, guided), attention_mask=mask)

    def run_forward(self, request: "ForwardRequest") -> torch.Tensor:
        """Step 4: the model on the request's inputs; logits [R(*2 with CFG), W, V] for the window."""
        keep = torch.arange(request.window_start - request.query_start, request.window_end - request.query_start,
                            device=self.x.device)
        return self.model(**request.inputs, attention_mask=request.attention_mask, cache=self.cache,
                          logits_to_keep=keep).logits

    def finish_step(self, request: "ForwardRequest", logits: torch.Tensor) -> torch.LongTensor:
        """Steps 4 (guidance) to 8 with the window's logits; returns the rows this step finished."""
        rows, window_start, block = request.rows, request.window_start, self.blocks[self.block_index]
        if self.config.cfg_scale > 0:
            logits = classifier_free_guidance(*logits.chunk(2), self.config.cfg_scale)
        self.nfe += 1
        self.forwards_taken[rows] += 1
        # 5. Candidates
        logits = self._shape_logits(logits, rows, window_start, block.end)
        candidates = _candidates(logits, self.config, self.generator)
        # 6. Scores: only masked positions of the window are eligible
        eligible = self.x[rows, window_start : block.end] == self.mask_id
        scores = self._scores(logits, candidates, eligible)
        # 7. Commit the scheduled number of best candidates per row (more with parallel decoding)
        count = _parallel_count(scores, self.schedule[rows, self.block_step], self.config, logits)
        chosen = _top_k_per_row(scores, count, eligible, window_start, self.x.shape[1])
        window = slice(window_start, block.end)
        self.x[rows, window] = torch.where(chosen, candidates, self.x[rows, window])
        self.commit_step[rows, window] = torch.where(chosen, self.steps_taken, self.commit_step[rows, window])
        self.block_step += 1
        self.steps_taken += 1
        # 8. Report and stop
        if self.config.output_history:
            self.history.append(self.visible(self.x).clone())
        if self.streamer is not None and hasattr(self.streamer, "put_draft"):
            self.streamer.put_draft(value=self.x[:, self.answer_start :].cpu())
        finished = self._finished_rows() & self.active
        self._fill_with_eos(finished)
        self.active &= ~finished
        self._advance()
        return finished.nonzero().squeeze(1)

    def remove(self, rows: torch.LongTensor | list[int]) -> None:
        """Cancel rows (indices into this state's batch): they take no more forward passes; others are unchanged."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.x.device)
        self.active[rows] = False
        self.removed[rows] = True
        self._advance()

    def output(self) -> "torch.LongTensor | DiffusionGenerationOutput":
        """What `generate` returns: the sequences, or a `DiffusionGenerationOutput` with
        `return_dict_in_generate=True` (step 9)."""
        sequences = self.visible(self.x)
        if not self.config.return_dict_in_generate:
            return sequences
        commit_step = self.commit_step[:, self.answer_start :]
        return DiffusionGenerationOutput(
            sequences=sequences,
            nfe=self.nfe,
            tokens_per_forward=(commit_step >= 0).sum(1).double() / self.forwards_taken.clamp(min=1),
            history=tuple(self.history) if self.config.output_history else None,
            commit_step=commit_step,
        )

    @property
    def answer_start(self) -> int:
        return self.prompt_length

    def visible(self, x: torch.Tensor) -> torch.Tensor:
        """What the caller sees of a [B, L] tensor: everything, or the answer when the prompt was embedded."""
        return x[:, self.prompt_length :] if self.prompt_embeds is not None else x

    # ---- blocks --------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Close the blocks that have nothing left to do (steps spent, no masks, no active rows).

        Each block's schedule spreads its masks over its steps; the first block's also counts masks left
        before it (masks inside the prompt), so every mask of the sequence is committed by the end.
        """
        while not self.done:
            block = self.blocks[self.block_index]
            if self.schedule is None:
                start = 0 if self.block_index == 0 else block.start
                self.schedule = tokens_per_step((self.x[:, start : block.end] == self.mask_id).sum(1), block.steps)
            rows = self.active.nonzero().squeeze(1)
            if self.block_step < block.steps and rows.numel() and bool((self.x[rows, : block.end] == self.mask_id).any()):
                return
            if self.streamer is not None:
                self.streamer.put(self.x[:, block.start : block.end].cpu())
            self.block_index, self.block_step, self.schedule = self.block_index + 1, 0, None
            if self.block_index == len(self.blocks) or not bool(self.active.any()):
                self.done = True
                if self.streamer is not None:
                    self.streamer.end()

    # ---- step 4: the model's inputs ------------------------------------------------------------

    def _model_inputs(self, rows: torch.LongTensor, start: int, end: int, guided: bool) -> dict:
        """`input_ids` for positions [start, end) of the rows, or `inputs_embeds` when the prompt is embedded;
        with CFG the unconditional copies (prompt masked) follow the rows."""
        ids = self.x[rows, start:end]
        unconditional = ids.masked_fill(self.prompt_positions[rows, start:end], self.mask_id)
        if self.prompt_embeds is None:
            return {"input_ids": torch.cat([ids, unconditional]) if guided else ids}
        embed = self.model.get_input_embeddings()
        prompt_end = max(min(self.prompt_length, end), start)  # positions [start, prompt_end) are the prompt's
        answer_ids = ids[:, prompt_end - start :]
        conditional = torch.cat([self.prompt_embeds[rows, start:prompt_end], embed(answer_ids)], dim=1)
        if not guided:
            return {"inputs_embeds": conditional}
        masked_prompt = embed(unconditional[:, : prompt_end - start])  # every prompt position is the mask
        unconditional_embeds = torch.cat([masked_prompt, embed(answer_ids)], dim=1)
        return {"inputs_embeds": torch.cat([conditional, unconditional_embeds])}

    # ---- steps 5-6: candidates and scores ------------------------------------------------------

    def _shape_logits(self, logits: torch.Tensor, rows: torch.LongTensor, window_start: int,
                      window_end: int) -> torch.Tensor:
        """Apply user processors and the token suppressions (step 5), in the logits' own dtype; the strategies
        score these logits."""
        config = self.config
        num_rows, width, vocab = logits.shape
        if self.logits_processor:
            sequences = self.visible(self.x[rows]) if self.prompt_embeds is not None else self.x[rows]
            repeated = sequences.repeat_interleave(width, dim=0)  # one copy of the row per position
            logits = self.logits_processor(repeated, logits.reshape(num_rows * width, vocab))
            logits = logits.reshape(num_rows, width, vocab)
        never = _token_ids(config.suppress_tokens)
        never += _token_ids(config.eos_token_id) if config.logits_eos_inf else []
        never += [config.mask_token_id] if config.logits_mask_inf else []
        _forbid(logits, never)
        answer_position = torch.arange(window_start, window_end, device=logits.device) - self.answer_start  # [W]
        if config.min_new_tokens:
            ends = _token_ids(config.eos_token_id) + _token_ids(config.eot_token_id)
            _forbid(logits, ends, (answer_position >= 0) & (answer_position < config.min_new_tokens))
        _forbid(logits, _token_ids(config.begin_suppress_tokens), answer_position == 0)
        return logits

    def _scores(self, logits: torch.Tensor, candidates: torch.LongTensor, eligible: torch.Tensor) -> torch.Tensor:
        """The strategy's scores [R, W]; -inf where nothing may be committed."""
        config = self.config
        if config.score_dtype is not None:
            logits = logits.to(getattr(torch, config.score_dtype))
        scores = self.strategy.score(logits, candidates, self.generator)
        if config.confidence_eos_eot_inf:
            ends = _token_ids(config.eos_token_id) + _token_ids(config.eot_token_id)
            # Lowest priority, yet still eligible: they are committed only when nothing else is left.
            scores = scores.masked_fill(torch.isin(candidates, _id_tensor(ends, candidates.device)),
                                        torch.finfo(scores.dtype).min)
        return scores.masked_fill(~eligible, float("-inf"))

    # ---- step 8: finishing rows ----------------------------------------------------------------

    def _finished_rows(self) -> torch.Tensor:
        """Rows whose answer is decided up to an EOS (early exit), or that a stopping criterion ends."""
        x, config = self.x, self.config
        finished = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if config.early_exit and config.eos_token_id is not None:
            answer = x[:, self.answer_start :]
            length = answer.shape[1]
            positions = torch.arange(length, device=x.device).expand_as(answer)
            is_eos = torch.isin(answer, _id_tensor(_token_ids(config.eos_token_id), x.device))
            first_eos = torch.where(is_eos, positions, length).min(1).values
            # The prompt may hold masks too (infilling): they must be decoded before the row is done.
            masks = x == self.mask_id
            first_mask = torch.where(masks, torch.arange(x.shape[1], device=x.device), x.shape[1]).min(1).values
            finished |= (first_eos + self.answer_start < first_mask) | (first_mask == x.shape[1])
        if self.stopping_criteria is not None:
            finished |= self.stopping_criteria(self.visible(x), None).to(x.device)
        return finished

    def _fill_with_eos(self, rows: torch.Tensor) -> None:
        if not bool(rows.any()) or self.config.eos_token_id is None:
            return
        eos = _token_ids(self.config.eos_token_id)[0]
        answer = self.x[:, self.answer_start :]
        answer[rows[:, None] & (answer == self.mask_id)] = eos


def _shared_forward(model, requests: list[ForwardRequest]) -> list[torch.Tensor]:
    """One forward pass for several full-sequence requests; returns each request's window logits.

    Shorter sequences are left-padded (masked out) and keep their own position ids, so each row sees what it
    sees alone; the LM head runs on the union of the windows.
    """
    lengths = [_inputs_tensor(request).shape[1] for request in requests]
    width = max(lengths)
    embedded = any("inputs_embeds" in request.inputs for request in requests)
    inputs, masks, positions, windows = [], [], [], []
    for request, length in zip(requests, lengths):
        shift = width - length  # left padding added for this request
        tensor = _inputs_tensor(request)
        if embedded and "input_ids" in request.inputs:
            tensor = model.get_input_embeddings()(tensor)
        inputs.append(F.pad(tensor, (0, 0, shift, 0) if embedded else (shift, 0)))  # pad id 0 / zeros: masked
        mask = request.attention_mask
        mask = torch.ones(tensor.shape[:2], dtype=torch.long, device=tensor.device) if mask is None else mask
        masks.append(F.pad(mask.long(), (shift, 0)))
        positions.append((torch.arange(width, device=tensor.device) - shift).expand(tensor.shape[0], width))
        windows.append((request.window_start + shift, request.window_end + shift))
    low, high = min(start for start, _ in windows), max(end for _, end in windows)
    logits = model(**{"inputs_embeds" if embedded else "input_ids": torch.cat(inputs)},
                   attention_mask=torch.cat(masks), position_ids=torch.cat(positions),
                   logits_to_keep=torch.arange(low, high, device=inputs[0].device)).logits  # [N, high - low, V]
    pieces, first_row = [], 0
    for tensor, (start, end) in zip(inputs, windows):
        pieces.append(logits[first_row : first_row + tensor.shape[0], start - low : end - low])
        first_row += tensor.shape[0]
    return pieces


def _inputs_tensor(request: ForwardRequest) -> torch.Tensor:
    return request.inputs.get("input_ids", request.inputs.get("inputs_embeds"))


class DiffusionEngine:
    """Decoding for requests that come and go: each `add` joins at the next step boundary with its own prompt,
    settings and block plan; `step()` advances every request by one denoising step; finished or cancelled
    rows leave without changing the other rows' tokens. The server and streaming clients drive it.

    Rows added in one call form one `DiffusionDecodingState`. At each step, the states without a key/value
    cache run as ONE forward pass (shorter sequences left-padded, each keeping its own position ids), and each
    state with a cache runs its own (its cache covers only its rows). Every request gets the tokens it would get
    from `generate` alone; `forward_passes` counts the passes run.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.generation_llada import DiffusionEngine
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> model = LladaForMaskedDiffusion(config).eval()
        >>> engine = DiffusionEngine(model)
        >>> [first] = engine.add(torch.tensor([[5, 6, 7]]), max_new_tokens=8, steps=8)
        >>> _ = engine.step()
        >>> [second] = engine.add(torch.tensor([[9, 10]]), max_new_tokens=4, steps=4, kv_cache="dual")
        >>> while engine.has_unfinished:
        ...     _ = engine.step()
        >>> engine.pop(first).shape, engine.pop(second).shape
        (torch.Size([11]), torch.Size([6]))
        ```
    """

    def __init__(self, model):
        self.model = model
        self.states: list[DiffusionDecodingState] = []
        self._rows: dict[int, tuple[DiffusionDecodingState, int]] = {}
        self._next_id = 0
        self.forward_passes = 0

    def add(self, input_ids=None, attention_mask=None, **kwargs) -> list[int]:
        """Add requests (the arguments of `generate`); returns one id per row, used by `pop`, `draft`, `remove`."""
        state = self.model.prepare_decoding(input_ids, attention_mask, **kwargs)
        ids = list(range(self._next_id, self._next_id + state.x.shape[0]))
        self._next_id += len(ids)
        self.states.append(state)
        for index, row_id in enumerate(ids):
            self._rows[row_id] = (state, index)
        return ids

    @property
    def has_unfinished(self) -> bool:
        return any(not state.done for state in self.states)

    def step(self) -> list[int]:
        """One denoising step for every unfinished request; returns the ids of the rows finished by now."""
        pending = [state for state in self.states if not state.done]
        shared = [state for state in pending if state.cache is None]  # full-sequence forwards: one pass
        if len(shared) > 1:
            requests = [state.plan_forward() for state in shared]
            for state, request, logits in zip(shared, requests, _shared_forward(self.model, requests)):
                state.finish_step(request, logits)
            self.forward_passes += 1
        for state in pending:
            if len(shared) < 2 or state.cache is not None:
                state.step()
                self.forward_passes += 1
        return [row_id for row_id in self._rows if self.is_finished(row_id)]

    def is_finished(self, row_id: int) -> bool:
        state, index = self._rows[row_id]
        return state.done or not bool(state.active[index])

    def draft(self, row_id: int) -> torch.LongTensor:
        """The row's current answer, masks still in place ([answer])."""
        state, index = self._rows[row_id]
        return state.x[index, state.answer_start :].clone()

    def pop(self, row_id: int) -> torch.LongTensor:
        """The finished row's sequence (as `generate` returns it, one row); the engine forgets the row."""
        if not self.is_finished(row_id):
            raise ValueError(f"Row {row_id} is still being decoded; call `step()` until `is_finished({row_id})`.")
        state, index = self._rows.pop(row_id)
        self._forget_empty_states()
        return state.visible(state.x)[index].clone()

    def remove(self, row_id: int) -> None:
        """Cancel a row: it takes no more forward passes and is forgotten; the other rows are unchanged."""
        state, index = self._rows.pop(row_id)
        if not state.done:
            state.remove([index])
        self._forget_empty_states()

    def _forget_empty_states(self) -> None:
        held = {id(state) for state, _ in self._rows.values()}
        self.states = [state for state in self.states if id(state) in held]


# --------------------------------------------------------------------------------------------------
# generate() and infill()
# --------------------------------------------------------------------------------------------------


class DiffusionGenerationMixin:
    """Gives `LladaForMaskedDiffusion` the diffusion `generate()` (and `infill()`, `prepare_decoding()`).

    It never decodes left to right: every call runs the masked-diffusion sampler through the step engine.
    Any model whose forward takes `input_ids | inputs_embeds, attention_mask, cache, logits_to_keep` and
    returns `.logits` can use it (LLaDA-V does, from `inputs_embeds`).
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
            generation_config: settings to use instead of the model's own (a config or a dict).
            logits_processor: applied to every masked position's logits at every step.
            stopping_criteria: called after every step with the current sequences (masks included);
                rows it marks as done are finished as by early exit.
            streamer: any streamer with transformers' protocol: `put` gets committed tokens block by block,
                `put_draft(value=...)` (when it has one) the answer with masks after every step. Batch size 1.
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
            inputs_embeds=inputs_embeds, **kwargs,
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
        config = self._diffusion_config(None, dict(kwargs, max_new_tokens=1))
        input_ids, attention_mask = self._prompt_tensors(input_ids, attention_mask, config)
        x, attention_mask = self._prepare_sequence(input_ids, attention_mask, config, answer_length=0)
        masks_per_row = (x == config.mask_token_id).sum(1)
        if int(masks_per_row.max()) == 0:
            raise ValueError(f"`input_ids` contains no mask token (id {config.mask_token_id}) to fill.")
        steps = min(steps or int(masks_per_row.max()), int(masks_per_row.max()))
        if steps <= 0:
            raise ValueError(f"`steps` must be a positive integer, got {steps}.")
        # The whole sequence plays the answer's part: outputs describe every position.
        state = DiffusionDecodingState(self, x, attention_mask, 0, [Block(0, x.shape[1], steps)], config,
                                       generator=generator)
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
        **kwargs,
    ) -> DiffusionDecodingState:
        """Steps 1-3 of `generate` (settings, sequence, plan): a `DiffusionDecodingState` ready to `step()`.

        Takes the arguments of `generate`. Example: see `DiffusionDecodingState`.
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
        self._resolve_lengths(config, prompt_length)
        x, attention_mask = self._prepare_sequence(input_ids, attention_mask, config, embedded=prompt_embeds is not None)
        # 2. Plan (3., the schedule, is made by the state at each block's first step)
        answer_length = config.max_new_tokens
        blocks = plan_blocks(prompt_length, answer_length, config.block_length or answer_length,
                             config.steps or answer_length)
        return DiffusionDecodingState(self, x, attention_mask, prompt_length, blocks, config,
                                      prompt_embeds=prompt_embeds, logits_processor=logits_processor,
                                      stopping_criteria=stopping_criteria, streamer=streamer, generator=generator)

    # ---- 1. settings and inputs ---------------------------------------------------------------

    def _diffusion_config(self, generation_config, kwargs: dict) -> DiffusionGenerationConfig:
        """The call's settings: the model's config (or `generation_config`) updated with `kwargs`, validated."""
        base = generation_config if generation_config is not None else self.generation_config
        if isinstance(base, dict):
            base = DiffusionGenerationConfig(**base)
        if not isinstance(base, GenerationConfig):
            raise TypeError(f"`generation_config` must be a GenerationConfig or a dict, got {type(base).__name__}.")
        config = DiffusionGenerationConfig.from_dict(base.to_dict())
        if isinstance(getattr(base, "remasking", None), RemaskingStrategy):
            config.remasking = base.remasking
        kwargs = dict(kwargs)
        if kwargs.get("max_length") is not None:
            if kwargs.get("max_new_tokens") is None:
                config.max_new_tokens = None  # max_length decides the answer length for this call
            else:
                warnings.warn("Both `max_new_tokens` and `max_length` were given; `max_new_tokens` decides the "
                              "answer length (as in transformers).", UserWarning, stacklevel=4)
        if kwargs.get("do_sample") is True and "temperature" not in kwargs and not config.temperature:
            kwargs["temperature"] = 1.0  # transformers' default sampling temperature
        if kwargs.get("do_sample") is False and (kwargs.get("temperature") or 0) > 0:
            warnings.warn(f"`do_sample=False`: greedy decoding; `temperature={kwargs['temperature']}` is used only "
                          "when sampling. Set `do_sample=True` or drop `temperature`.", UserWarning, stacklevel=4)
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

    def _resolve_lengths(self, config: DiffusionGenerationConfig, prompt_length: int) -> None:
        """`max_length`/`min_length` (which count the prompt) become answer lengths; refuse, before anything is
        allocated, a sequence longer than the model's context (or warn, with `allow_beyond_context=True`)."""
        if config.max_new_tokens is None:
            if config.max_length is None:
                raise ValueError("Pass `max_new_tokens` (the answer length) or `max_length` (prompt + answer).")
            if config.max_length <= prompt_length:
                raise ValueError(f"`max_length` ({config.max_length}) must exceed the prompt length "
                                 f"({prompt_length}); pass `max_new_tokens` for the answer length instead.")
            config.max_new_tokens = config.max_length - prompt_length
        if config.min_length:
            config.min_new_tokens = max(config.min_new_tokens or 0, config.min_length - prompt_length)
        total = prompt_length + config.max_new_tokens
        context = getattr(self.config, "max_position_embeddings", None)
        if context is not None and total > context:
            message = (f"The prompt ({prompt_length} tokens) + `max_new_tokens` ({config.max_new_tokens}) = {total} "
                       f"positions, more than the model's context (`max_position_embeddings` = {context}).")
            if not config.allow_beyond_context:
                raise ValueError(message + " Shorten the prompt or the answer, or pass `allow_beyond_context=True`.")
            warnings.warn(message + " Going on (`allow_beyond_context=True`).", UserWarning, stacklevel=4)

    def _prepare_sequence(self, input_ids, attention_mask, config, answer_length=None, embedded=False):
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
        answer_length = config.max_new_tokens if answer_length is None else answer_length
        answer = torch.full((batch_size, answer_length), config.mask_token_id, dtype=torch.long, device=self.device)
        x = torch.cat([input_ids.long(), answer], dim=1)  # [B, P + G]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(answer)], dim=1)
        return x, attention_mask


__all__ = [
    "DIFFUSION_OPTIONS",
    "HONOURED_FIELDS",
    "REFUSED_FIELDS",
    "GenerationOption",
    "DiffusionGenerationConfig",
    "DiffusionGenerationMixin",
    "DiffusionGenerationOutput",
    "DiffusionDecodingState",
    "DiffusionEngine",
    "RemaskingStrategy",
    "LowConfidenceRemasking",
    "RandomRemasking",
    "MarginRemasking",
    "EntropyRemasking",
    "REMASKING_STRATEGIES",
    "register_remasking_strategy",
    "TextDiffusionStreamer",
    "render_draft",
    "DiffusionCache",
    "classifier_free_guidance",
    "left_pad",
    "plan_blocks",
    "tokens_per_step",
]
