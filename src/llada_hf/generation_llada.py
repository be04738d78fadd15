"""Diffusion generation for LLaDA: the paper's samplers behind the ordinary `model.generate()`.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

Three small pieces plug into one loop (`DiffusionGenerationMixin.generate`):
- the *plan*: which positions form each block and how many steps each block gets (`plan_blocks`);
- the *schedule*: how many tokens each step commits (`tokens_per_step`);
- the *strategy*: how the candidates at masked positions are scored (`RemaskingStrategy` objects,
  registered by name: "low_confidence", "random", "margin", "entropy"); the most confident are committed.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.configuration_utils import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import ModelOutput

from .streaming_llada import TextDiffusionStreamer, render_draft


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

# Fields this class adds to `GenerationConfig`, with their defaults (the official sampler's behaviour).
DIFFUSION_DEFAULTS = {
    "steps": None,  # None: one step per answer token
    "block_length": None,  # None: one block (no semi-autoregressive split)
    "remasking": "low_confidence",
    "cfg_scale": 0.0,
    "logits_eos_inf": False,
    "logits_mask_inf": False,
    "confidence_eos_eot_inf": False,
    "mask_token_id": None,
    "eot_token_id": None,
    "output_history": False,
    "early_exit": False,
    "kv_cache": None,  # None, "prefix" or "dual"
    "confidence_threshold": None,
    "parallel_factor": None,
}


KV_CACHE_MODES = (None, "prefix", "dual")
# Attention backends whose handling of a query range shorter than the keys we have tested with the cache.
CACHE_ATTENTION_BACKENDS = ("eager", "sdpa")


class DiffusionGenerationConfig(GenerationConfig):
    """Parameters of the diffusion sampler, saved in `generation_config.json` next to the model.

    Beyond the usual `GenerationConfig` fields (`max_new_tokens`, `temperature`, `top_k`, `top_p`,
    `eos_token_id`, `pad_token_id`, `return_dict_in_generate`, ...) it holds:

    - `steps`: total denoising steps over the whole answer (default: `max_new_tokens`).
    - `block_length`: semi-autoregressive block size (default: `max_new_tokens`, i.e. one block).
    - `remasking`: a strategy name ("low_confidence", "random", "margin", "entropy") or a
      `RemaskingStrategy` instance.
    - `cfg_scale`: unsupervised classifier-free guidance scale (0 = off).
    - `logits_eos_inf`: forbid EOS as a candidate (its logit is set to -inf).
    - `logits_mask_inf`: forbid the mask token as a candidate. Off by default, as in the official sampler,
      which may commit the mask token itself (the position then stays masked after its step).
    - `confidence_eos_eot_inf`: give EOS/EoT candidates the lowest confidence, so they are committed
      only when nothing else is left in the block (the intended meaning of the official flag).
    - `mask_token_id`, `eot_token_id`: the mask and end-of-turn token ids.
    - `output_history`: with `return_dict_in_generate`, keep the sequence after every step.
    - `early_exit`: stop a row once its answer is decided up to an EOS (the rest is filled with EOS).
    - `kv_cache`: None, "prefix" or "dual" — Fast-dLLM's key/value caches (see `DiffusionCache`).
    - `confidence_threshold` (tau in (0, 1]): also commit every candidate whose score reaches tau.
    - `parallel_factor` (f > 0): also commit the leading run of sorted scores with c_n >= 1 - f / (n + 1).
      With either, `steps` is an upper bound: each step commits at least its scheduled share.

    Example:
        ```python
        >>> from llada_hf.generation_llada import DiffusionGenerationConfig
        >>> config = DiffusionGenerationConfig(max_new_tokens=64, steps=64, block_length=32, mask_token_id=126336)
        >>> config.block_length, config.remasking
        (32, 'low_confidence')
        ```
    """

    def __init__(self, **kwargs):
        for name, default in DIFFUSION_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.setdefault("max_new_tokens", 128)
        kwargs.setdefault("temperature", 0.0)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "DiffusionGenerationConfig":
        """Take the token ids from the model config; everything else keeps the sampler's defaults."""
        config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")
        return cls(**{key: config_dict[key] for key in ids if config_dict.get(key) is not None})

    def validate(self, strict: bool = False, user_set_attributes=None) -> None:
        """Reject values the sampler cannot run with; each message names the field to change."""
        for name in ("max_new_tokens", "steps", "block_length"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.cfg_scale is None or self.cfg_scale < 0:
            raise ValueError(f"`cfg_scale` must be >= 0 (0 = no guidance), got {self.cfg_scale}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"`top_k` must be a non-negative integer, got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must lie in (0, 1], got {self.top_p}.")
        resolve_strategy(self.remasking)  # raises on an unknown name
        if self.kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"`kv_cache` must be one of {KV_CACHE_MODES}, got {self.kv_cache!r}.")
        if self.confidence_threshold is not None and not 0 < self.confidence_threshold <= 1:
            raise ValueError(f"`confidence_threshold` must lie in (0, 1], got {self.confidence_threshold}.")
        if self.parallel_factor is not None and not self.parallel_factor > 0:
            raise ValueError(f"`parallel_factor` must be > 0, got {self.parallel_factor}.")
        if self.mask_token_id is not None and self.mask_token_id == self.pad_token_id:
            raise ValueError(
                f"`pad_token_id` equals `mask_token_id` ({self.mask_token_id}): padding would be read as masks "
                "to fill. Use another pad token (LLaDA pads with EOS)."
            )

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
    """The paper's default: the softmax probability of the candidate (float64, as the official code)."""

    name = "low_confidence"

    def score(self, logits, candidates, generator=None):
        probs = F.softmax(logits.to(torch.float64), dim=-1)  # [B, W, V]
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


for _strategy in (LowConfidenceRemasking, RandomRemasking, MarginRemasking, EntropyRemasking):
    register_remasking_strategy(_strategy)


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
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class DiffusionGenerationOutput(ModelOutput):
    """What `generate(..., return_dict_in_generate=True)` returns.

    Args:
        sequences: [B, prompt + answer] token ids.
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
# The sampler
# --------------------------------------------------------------------------------------------------


class DiffusionGenerationMixin:
    """Gives `LladaForMaskedDiffusion` the diffusion `generate()` (and `infill()`).

    It never decodes left to right: every call runs the masked-diffusion sampler.
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
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria=None,
        streamer=None,
        generator: torch.Generator | None = None,
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
           number each step (see `tokens_per_step`).
        4. Each step runs the model once. With `cfg_scale > 0`, a copy in which every prompt position is
           masked runs in the same batch, and the logits become u + (w + 1)(c - u). Logits are computed
           only for the active window: from the first masked position to the end of the block.
        5. Candidates: `logits_processor`, `logits_eos_inf` and `logits_mask_inf` shape the logits; at temperature 0 the
           candidate is the argmax, otherwise a sample from softmax(logits / T) restricted by
           `top_k`/`top_p` (which shape the candidates only, not the scores of step 6).
        6. Scores: the remasking strategy scores each masked candidate; decoded positions and positions
           after the block are never chosen; masks before the block (in the prompt) stay eligible.
        7. Commit: per row, the scheduled number of highest-scoring candidates.
        8. Report and stop: streamers get drafts and finished blocks; a row whose answer is decided up to
           an EOS (`early_exit`) or that a stopping criterion ends has its remaining masks filled with EOS
           and takes no more forward passes; generation ends when every row is finished.
        9. Return prompt + answer ([B, L]), or a `DiffusionGenerationOutput` with
           `return_dict_in_generate=True`.

        With the defaults this reproduces the official LLaDA `generate` token for token (same weights,
        same settings, temperature 0).

        Args:
            input_ids: [B, P] prompt ids, left-padded for batches of different lengths.
            attention_mask: [B, P], 1 for tokens and 0 for (left) padding.
            generation_config: settings to use instead of the model's own.
            logits_processor: applied to every masked position's logits at every step.
            stopping_criteria: called after every step with the current sequences (masks included);
                rows it marks as done are finished as by early exit.
            streamer: a `TextStreamer` (committed tokens, block by block) or `TextDiffusionStreamer`
                (also a draft after every step). Batch size 1.
            generator: a `torch.Generator` for reproducible sampling.
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
        # 1. Settings and the initial sequence
        config = self._diffusion_config(generation_config, kwargs)
        x, attention_mask = self._prepare_sequence(input_ids, attention_mask, config)
        prompt_length = input_ids.shape[1]
        answer_length = config.max_new_tokens
        # 2. Plan
        blocks = plan_blocks(prompt_length, answer_length, config.block_length or answer_length,
                             config.steps or answer_length)
        return self._denoise(x, attention_mask, prompt_length, blocks, config, logits_processor, stopping_criteria,
                             streamer, generator)

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
        x, attention_mask = self._prepare_sequence(input_ids, attention_mask, config, answer_length=0)
        masks_per_row = (x == config.mask_token_id).sum(1)
        if int(masks_per_row.max()) == 0:
            raise ValueError(f"`input_ids` contains no mask token (id {config.mask_token_id}) to fill.")
        steps = min(steps or int(masks_per_row.max()), int(masks_per_row.max()))
        if steps <= 0:
            raise ValueError(f"`steps` must be a positive integer, got {steps}.")
        blocks = [Block(0, x.shape[1], steps)]
        # The whole sequence plays the answer's part: outputs describe every position.
        return self._denoise(x, attention_mask, 0, blocks, config, None, None, None, generator)

    # ---- 1. settings and inputs ---------------------------------------------------------------

    def _diffusion_config(self, generation_config, kwargs) -> DiffusionGenerationConfig:
        base = generation_config if generation_config is not None else self.generation_config
        config = DiffusionGenerationConfig.from_dict(base.to_dict())
        if isinstance(getattr(base, "remasking", None), RemaskingStrategy):
            config.remasking = base.remasking
        if kwargs.get("max_length") is not None and kwargs.get("max_new_tokens") is None:
            raise ValueError("Pass `max_new_tokens` (the answer length) rather than `max_length`.")
        kwargs.pop("max_length", None)
        # The model config is the fallback for the token ids (generation_config.json may omit them).
        for key in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, key, None) is None:
                setattr(config, key, getattr(self.config, key, None))
        unused = config.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unexpected arguments: {sorted(unused)}.")
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

    def _prepare_sequence(self, input_ids, attention_mask, config, answer_length=None):
        """Check the prompt and append the masked answer: returns x [B, P + G] and its attention mask."""
        if input_ids is None:
            raise ValueError("Pass the prompt as `input_ids` ([batch, length] token ids).")
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
        batch_size, prompt_length = input_ids.shape
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch_size, prompt_length):
                raise ValueError(
                    f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got "
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
            if config.pad_token_id is not None and bool(
                ((input_ids == config.mask_token_id) & (attention_mask == 0)).any()
            ):
                raise ValueError("Padding positions hold the mask token; pad with another token (LLaDA uses EOS).")
        answer_length = config.max_new_tokens if answer_length is None else answer_length
        answer = torch.full((batch_size, answer_length), config.mask_token_id, dtype=torch.long, device=self.device)
        x = torch.cat([input_ids.long(), answer], dim=1)  # [B, P + G]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(answer)], dim=1)
        return x, attention_mask

    # ---- the loop ------------------------------------------------------------------------------

    def _denoise(self, x, attention_mask, prompt_length, blocks, config, logits_processor, stopping_criteria,
                 streamer, generator):
        mask_id = config.mask_token_id
        strategy = resolve_strategy(config.remasking)
        batch_size = x.shape[0]
        prompt_positions = x != mask_id  # CFG masks these in its unconditional copy
        active = torch.ones(batch_size, dtype=torch.bool, device=x.device)  # rows still being decoded
        commit_step = torch.full_like(x, -1)
        forwards_taken = torch.zeros(batch_size, dtype=torch.long, device=x.device)
        cache = DiffusionCache(config.kv_cache) if config.kv_cache else None
        history, nfe, step_counter = [], 0, 0
        if streamer is not None:
            streamer.put(x[:, :prompt_length].cpu())

        for block in blocks:
            # 3. Schedule: per row, the block's masks spread over its steps
            schedule = tokens_per_step((x[:, block.start:block.end] == mask_id).sum(1), block.steps)
            for step in range(block.steps):
                rows = active.nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                is_masked = x[rows] == mask_id  # [R, L]
                has_mask = is_masked[:, : block.end].any(0)
                if not bool(has_mask.any()):
                    break
                window_start = int(has_mask.nonzero()[0])  # first masked position of any active row
                # 4. Logits for the active window [window_start, block.end)
                logits = self._window_logits(x, attention_mask, prompt_positions, rows, window_start, block,
                                             step == 0, config, cache)
                nfe += 1
                forwards_taken[rows] += 1
                # 5. Candidates
                logits = self._shape_logits(logits, x[rows], config, logits_processor)
                candidates = self._candidates(logits, config, generator)
                # 6. Scores: only masked positions of the window are eligible
                eligible = is_masked[:, window_start : block.end]
                scores = strategy.score(logits, candidates, generator).to(torch.float64)
                if config.confidence_eos_eot_inf:
                    ends = _token_ids(config.eos_token_id) + _token_ids(config.eot_token_id)
                    # Lowest priority, yet still eligible: they are committed only when nothing else is left.
                    scores = scores.masked_fill(torch.isin(candidates, _id_tensor(ends, x.device)),
                                                torch.finfo(torch.float64).min)
                scores = scores.masked_fill(~eligible, float("-inf"))
                # 7. Commit the scheduled number of best candidates per row (more with parallel decoding)
                count = _parallel_count(scores, schedule[rows, step], config.confidence_threshold,
                                        config.parallel_factor)
                chosen = _top_k_per_row(scores, count, eligible)
                window = x[rows, window_start : block.end]
                x[rows, window_start : block.end] = torch.where(chosen, candidates, window)
                commit_step[rows, window_start : block.end] = torch.where(
                    chosen, step_counter, commit_step[rows, window_start : block.end]
                )
                step_counter += 1
                # 8. Report and stop
                if config.output_history:
                    history.append(x.clone())
                if streamer is not None and hasattr(streamer, "put_draft"):
                    streamer.put_draft(value=x[:, prompt_length:].cpu())
                finished = self._finished_rows(x, prompt_length, config, stopping_criteria)
                self._fill_finished(x, finished & active, prompt_length, config)
                active &= ~finished
            if streamer is not None:
                streamer.put(x[:, block.start:block.end].cpu())
            if not bool(active.any()):
                break
        if streamer is not None:
            streamer.end()

        # 9. Return
        if not config.return_dict_in_generate:
            return x
        answer_commits = (commit_step[:, prompt_length:] >= 0).sum(1)
        return DiffusionGenerationOutput(
            sequences=x,
            nfe=nfe,
            tokens_per_forward=answer_commits.double() / forwards_taken.clamp(min=1),
            history=tuple(history) if config.output_history else None,
            commit_step=commit_step[:, prompt_length:],
        )

    def _window_logits(self, x, attention_mask, prompt_positions, rows, window_start, block, block_start_step,
                       config, cache):
        """Run the model on the active rows and return logits [R, W, V] for the window (step 4).

        Without a cache the whole sequence runs. With one, the first step of a block runs the whole
        sequence and refills the cache; later steps run only the block and what follows it ("prefix") or
        only the block ("dual") against the cached keys/values. A step whose window starts before the block
        (masks left in the prompt) runs in full, since the cached prefix is then still changing.
        """
        inputs = x[rows]
        mask = attention_mask[rows] if attention_mask is not None else None
        if config.cfg_scale > 0:
            inputs = torch.cat([inputs, inputs.masked_fill(prompt_positions[rows], config.mask_token_id)])
            mask = torch.cat([mask, mask]) if mask is not None else None
            rows = torch.cat([rows, rows + x.shape[0]])  # the unconditional copy has rows of its own in the cache
        query_start, query_end = 0, x.shape[1]
        if cache is not None and not block_start_step and window_start >= block.start and cache.holds(rows):
            query_start = block.start
            query_end = block.end if cache.mode == "dual" else x.shape[1]
            cache.keep_rows(rows)
        elif cache is not None:
            cache.start_refill(rows)
        if cache is not None:
            cache.set_query_start(query_start)
        keep = torch.arange(window_start - query_start, block.end - query_start, device=x.device)
        logits = self(input_ids=inputs[:, query_start:query_end], attention_mask=mask, cache=cache,
                      logits_to_keep=keep).logits  # [R(*2), W, V]
        if config.cfg_scale > 0:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + (config.cfg_scale + 1) * (conditional - unconditional)
        return logits

    @staticmethod
    def _shape_logits(logits, sequences, config, logits_processor):
        """Apply user processors and EOS / mask-token suppression (step 5); the strategies score these logits."""
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        rows, width, vocab = logits.shape
        if logits_processor:
            repeated = sequences.repeat_interleave(width, dim=0)  # one copy of the row per position
            logits = logits_processor(repeated, logits.reshape(rows * width, vocab)).reshape(rows, width, vocab)
        if config.logits_eos_inf:
            logits[..., _token_ids(config.eos_token_id)] = float("-inf")
        if config.logits_mask_inf:
            logits[..., config.mask_token_id] = float("-inf")
        return logits

    @staticmethod
    def _candidates(logits, config, generator):
        """Argmax at temperature 0; otherwise a sample from softmax(logits / T), after top-k/top-p
        filtering, by Gumbel-max in float64. Filtering shapes the candidates only, not their scores."""
        if not config.temperature:
            return logits.argmax(-1)
        rows, width, vocab = logits.shape
        flat = logits.reshape(rows * width, vocab).to(torch.float64) / config.temperature
        if config.top_k:
            flat = TopKLogitsWarper(config.top_k)(None, flat)
        if config.top_p is not None and config.top_p < 1.0:
            flat = TopPLogitsWarper(config.top_p)(None, flat)
        uniform = torch.rand(flat.shape, generator=generator, device=flat.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
        return (flat + gumbel).argmax(-1).reshape(rows, width)

    @staticmethod
    def _finished_rows(x, prompt_length, config, stopping_criteria):
        """Rows whose answer is decided up to an EOS (early exit), or that a stopping criterion ends."""
        finished = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if config.early_exit and config.eos_token_id is not None:
            answer = x[:, prompt_length:]
            length = answer.shape[1]
            positions = torch.arange(length, device=x.device).expand_as(answer)
            is_eos = torch.isin(answer, _id_tensor(_token_ids(config.eos_token_id), x.device))
            first_eos = torch.where(is_eos, positions, length).min(1).values
            # The prompt may hold masks too (infilling): they must be decoded before the row is done.
            masks = x == config.mask_token_id
            first_mask = torch.where(masks, torch.arange(x.shape[1], device=x.device), x.shape[1]).min(1).values
            finished |= (first_eos + prompt_length < first_mask) | (first_mask == x.shape[1])
        if stopping_criteria is not None:
            finished |= stopping_criteria(x, None).to(x.device)
        return finished

    @staticmethod
    def _fill_finished(x, rows, prompt_length, config):
        if not bool(rows.any()) or config.eos_token_id is None:
            return
        eos = _token_ids(config.eos_token_id)[0]
        answer = x[:, prompt_length:]
        answer[rows[:, None] & (answer == config.mask_token_id)] = eos


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

    `generate(kv_cache="prefix" | "dual")` creates one. At the first step of every block the model runs the
    whole sequence and the cache keeps every position's keys/values; later steps of the block run only
    the block and the positions after it (prefix) or only the block (dual), replacing those positions'
    keys/values. It also remembers which batch rows it holds, so finished rows can leave the batch.
    """

    def __init__(self, mode: str = "prefix"):
        super().__init__(layer_class_to_replicate=DiffusionCacheLayer)
        self.mode = mode
        self.rows: torch.Tensor | None = None  # batch rows (of x, CFG copies offset by the batch size) held

    def start_refill(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def holds(self, rows: torch.Tensor) -> bool:
        """Whether every requested row has cached keys/values."""
        return self.rows is not None and bool(torch.isin(rows, self.rows).all())

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the rows that are no longer decoded (early exit)."""
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


def _parallel_count(scores, scheduled, threshold, factor) -> torch.LongTensor:
    """Tokens to commit per row: the schedule, raised by threshold or factor parallel decoding.

    threshold: every eligible score >= threshold counts. factor (Fast-dLLM's rule): with scores sorted
    c1 >= c2 >= ..., the leading run with c_n >= 1 - factor / (n + 1) counts. The schedule is the floor,
    so a block always finishes within its steps, and at least the most confident token is committed.
    """
    count = scheduled
    if threshold is not None:
        count = torch.maximum(count, (scores >= threshold).sum(1))
    if factor is not None:
        ranked = scores.sort(dim=1, descending=True).values  # [R, W]
        n = torch.arange(1, ranked.shape[1] + 1, device=scores.device, dtype=torch.float64)
        passes = ranked >= 1 - factor / (n + 1)
        run = passes.long().cumprod(1).sum(1)  # length of the leading run that passes
        count = torch.maximum(count, run)
    if threshold is not None or factor is not None:
        count = count.clamp(min=1)
    return count


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _id_tensor(ids: list[int], device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def _top_k_per_row(scores: torch.Tensor, k: torch.LongTensor, eligible: torch.Tensor) -> torch.Tensor:
    """Boolean [R, W]: the k[r] highest scores of each row among its eligible positions."""
    k = torch.minimum(k, eligible.sum(1))
    max_k = int(k.max()) if k.numel() else 0
    chosen = torch.zeros_like(eligible)
    if max_k == 0:
        return chosen
    top = scores.topk(max_k, dim=1).indices  # [R, max_k], best first
    keep = torch.arange(max_k, device=scores.device)[None, :] < k[:, None]
    return chosen.scatter(1, top, keep) & eligible


__all__ = [
    "DiffusionGenerationConfig",
    "DiffusionGenerationMixin",
    "DiffusionGenerationOutput",
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
    "plan_blocks",
    "tokens_per_step",
]
