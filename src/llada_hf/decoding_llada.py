"""The decoding machinery behind `generate`: strategies, plan and schedule, caches, and the step engine.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.
This file is the step engine: what one denoising step does. It imports no other part of the sampler;
`generation_llada.py` (the settings, `generate()`, `infill()`, `prepare_decoding()`) builds on it:

- *Strategies*: how the candidates at masked positions are scored (`RemaskingStrategy` objects, registered
  by name: "low_confidence", "random", "margin", "entropy"); the most confident are committed.
- *Plan and schedule*: which positions form each block and how many steps each gets (`plan_blocks`), and
  how many tokens each step commits (`tokens_per_step`).
- *Caches* (Fast-dLLM): a state with `kv_cache` keeps a `DiffusionCache` (cache_llada.py, beside the model);
  at the first step of a row's block the model runs the row's whole sequence, later steps only the block and what
  follows it ("prefix") or only the block ("dual"). The cache decides each row's query range (`query_range`).
- *Candidates, scores, commits*: plain functions of tensors, including parallel decoding
  (`confidence_threshold`, `parallel_factor`, `entropy_bound`) and the official tie-breaking.
- *The step engine*: `DiffusionDecodingState` (rows with the same settings, each cohort at its own block; `step()`
  = `plan_forward` -> `run_forward` -> `finish_step`), the shared forward passes (`_run_forwards`: the rows of
  every state in as few passes as their shapes allow) and `DiffusionEngine` (continuous batching: requests join
  and leave between steps, whatever their settings).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

from .cache_llada import DiffusionCache
from .policy_llada import StepSignals, resolve_policy


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
        >>> from llada_hf.decoding_llada import RemaskingStrategy
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
        >>> from llada_hf.decoding_llada import plan_blocks
        >>> blocks = plan_blocks(prompt_length=5, answer_length=10, block_length=4, steps=7)
        >>> [(b.start, b.end, b.steps) for b in blocks]
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


def tokens_per_step(num_masked: torch.LongTensor, steps: "int | torch.LongTensor") -> torch.LongTensor:
    """How many tokens each step commits, per row: [B] masks over `steps` steps (one number, or one per row)
    -> [B, steps] (the most steps; zeros after a row's own).

    LLaDA's linear noise schedule commits the same number each step; the remainder goes to the first
    steps (the official rule).

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.decoding_llada import tokens_per_step
        >>> tokens_per_step(torch.tensor([10, 3]), 4)
        tensor([[3, 3, 2, 2],
                [1, 1, 1, 0]])
        ```
    """
    steps = torch.as_tensor(steps, device=num_masked.device)
    base, remainder = num_masked // steps, num_masked % steps
    step_index = torch.arange(int(steps.max()), device=num_masked.device)
    counts = base[:, None] + (step_index[None, :] < remainder[:, None]).long()
    return counts * (step_index < steps.reshape(-1, 1))  # rows with fewer steps: nothing after them


# --------------------------------------------------------------------------------------------------
# Small pieces shared by generation and the tooling
# --------------------------------------------------------------------------------------------------


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """LLaDA's unsupervised classifier-free guidance: u + (w + 1)(c - u), in the logits' own dtype.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.decoding_llada import classifier_free_guidance
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
        >>> from llada_hf.decoding_llada import left_pad
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


def _forbid(logits: torch.Tensor, ids: list[int], where: torch.Tensor | None = None) -> None:
    """Set the logits of `ids` to -inf in place ([R, W, V]), at every position or where `where` ([R, W]) holds."""
    if not ids:
        return
    ids = _id_tensor(ids, logits.device)
    if where is None:
        logits[..., ids] = float("-inf")
    else:
        logits[..., ids] = logits[..., ids].masked_fill(where[..., None], float("-inf"))


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
# Candidates, scores and commits (steps 5-7), as plain functions of tensors
# --------------------------------------------------------------------------------------------------


def _candidates(logits: torch.Tensor, config: GenerationConfig, generator) -> torch.LongTensor:
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


def _sampling_warpers(config: GenerationConfig, device: torch.device) -> list:
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


def _parallel_count(scores, scheduled, config: GenerationConfig, logits=None) -> torch.LongTensor:
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


def _check_finite(logits: torch.Tensor, candidates: torch.LongTensor, scores: torch.Tensor, eligible: torch.Tensor,
                  step: int) -> None:
    """Stop before committing anything when a masked position has no finite candidate or score: NaN would
    otherwise turn into arbitrary tokens (id 0, or the mask id) without a word."""
    chosen_logits = logits.gather(-1, candidates[..., None]).squeeze(-1)
    broken = eligible & ~(torch.isfinite(chosen_logits) & ~torch.isnan(scores))
    if bool(broken.any()):
        row, position = (int(i) for i in broken.nonzero()[0])
        raise ValueError(
            f"Decoding step {step}: the logits are not finite at {int(broken.sum())} masked position(s) (first: "
            f"row {row}, window position {position}), so no token can be chosen. Likely causes: NaN or inf in the "
            "model's weights, `inputs_embeds` or `pixel_values`; a logits processor that returns NaN; "
            "`suppress_tokens` that cover the whole vocabulary; a float16 overflow (try bfloat16 or float32)."
        )


def _top_k_per_row(scores: torch.Tensor, k: torch.LongTensor, eligible: torch.Tensor, columns: torch.LongTensor,
                   length: int) -> torch.Tensor:
    """Boolean [R, W]: the k[r] highest scores of each row among its eligible positions; `columns` [R, W] is each
    window position's place in the sequence (ineligible positions may share one).

    Ties are broken exactly as the official sampler breaks them: `torch.topk` with that row's own k, over
    the whole sequence (the window in its place among -inf), in the scores' own dtype. (topk with a
    larger k does not pick the same tied positions, so rows are grouped by k.)
    """
    rows = scores.shape[0]
    k = torch.minimum(k, eligible.sum(1))
    confidence = scores.new_full((rows, length), float("-inf"))
    # amax: a shared place keeps the eligible score (ineligible scores are -inf)
    confidence.scatter_reduce_(1, columns, scores.masked_fill(~eligible, float("-inf")), "amax")
    chosen = torch.zeros(rows, length, dtype=torch.bool, device=scores.device)
    for value in k.unique().tolist():
        if value == 0:
            continue
        group = (k == value).nonzero().squeeze(1)
        top = confidence[group].topk(value, dim=1).indices  # [G, value]
        chosen[group[:, None], top] = True
    return chosen.gather(1, columns) & eligible


# --------------------------------------------------------------------------------------------------
# The step engine
# --------------------------------------------------------------------------------------------------


@dataclass
class ForwardRequest:
    """One step of a `DiffusionDecodingState`, as the model must run it (`plan_forward` makes it).

    Per row that takes the step (`rows`, [R]): its window [window_start, window_end) (the positions whose logits the
    step needs), the positions its forward covers [query_start, query_end), where its canvas ends (`key_end`: its
    keys are positions [0, key_end)), and whether the forward reads the row's cached keys (`cached`) or runs its
    whole canvas (no cache, or a refresh that stores the row's keys again). With CFG every row runs twice: its
    forward rows are 2 * row (conditional) and 2 * row + 1 (prompt masked). `passes` counts the forward passes that
    served the request (set when it has run).
    """

    state: "DiffusionDecodingState"
    rows: torch.LongTensor
    window_start: torch.LongTensor
    window_end: torch.LongTensor
    query_start: torch.LongTensor
    query_end: torch.LongTensor
    key_end: torch.LongTensor
    cached: torch.Tensor
    passes: int = 0


class DiffusionDecodingState:
    """The decoding state of rows with the same settings, and `step()`, one denoising step for them.

    Build one with `model.prepare_decoding(...)` (it takes `generate`'s arguments), then call `step()` until
    `done`; `output()` gives what `generate` returns. Rows added together (a *cohort*) move through the block plan
    together, as one batch of `generate` does; `DiffusionEngine` lets later requests with the same settings `join`
    a running state as cohorts of their own, each at its own block and step. Every row has its own window, decides
    for itself when its cache needs a refresh, and gets the tokens it would get alone. Rows leave when they finish
    (their last block, early exit, stopping criteria) or when `remove(rows)` cancels them.

    `config` holds the call's validated settings (a `DiffusionGenerationConfig`, typed by its transformers base so
    that the engine needs nothing from generation_llada.py). The ids of `x` are trusted: `prepare_decoding` checks
    the prompt once, and every later id is a token this state committed, so the forwards skip the model's check
    of the ids' range (`check_input_ids=False`, host syncs at every step otherwise).

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
        config: GenerationConfig,
        prompt_embeds: torch.Tensor | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria=None,
        streamer=None,
        generator: torch.Generator | None = None,
    ):
        self.model = model
        self.config = config
        self.strategy = resolve_strategy(config.remasking)
        self.policy = resolve_policy(getattr(config, "decoding_policy", None))  # a learned unmasking policy, or None
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
        self.copies = 2 if config.cfg_scale > 0 else 1  # forward rows per row: CFG adds a copy with the prompt masked
        self.pad_id = _pad_id(config)  # fills positions a row does not use (never the mask: it would be decoded)
        batch, device = x.shape[0], x.device
        self.prompt_positions = x != self.mask_id  # CFG masks these in its unconditional copy
        self.active = torch.ones(batch, dtype=torch.bool, device=device)  # rows still being decoded
        # `stop_token_ids`: per row, the position of its earliest committed stop token (the sequence's length when
        # there is none yet)
        stop_ids = _token_ids(config.stop_token_ids)
        self.stop_ids = _id_tensor(stop_ids, device) if stop_ids else None
        self.stop_at = torch.full_like(self.active, x.shape[1], dtype=torch.long)
        self.commit_step = torch.full_like(x, -1)
        self.forwards_taken = torch.zeros(batch, dtype=torch.long, device=device)
        # What a policy remembers per position: the last argmax, and for how many steps in a row it was the same
        self.last_argmax = torch.full_like(x, -1) if self.policy is not None else None
        self.stable_steps = torch.zeros_like(x) if self.policy is not None else None
        # Progress, per row: its cohort (rows added together move in step), the block it is in, the steps its cohort
        # took in that block and in all, and what each step of the block commits.
        self.cohort = torch.zeros(batch, dtype=torch.long, device=device)
        self.cohorts = 1
        self.row_block = torch.zeros_like(self.cohort)
        self.row_block_step = torch.zeros_like(self.cohort)
        self.row_steps = torch.zeros_like(self.cohort)
        self.schedule = torch.zeros(batch, max(block.steps for block in blocks), dtype=torch.long, device=device)
        # Columns added on a row's left since it was added (when a longer prompt joined): its position ids are its
        # column minus these, the positions it has alone.
        self.position_offset = torch.zeros_like(self.cohort)
        self.cache = DiffusionCache(config.kv_cache) if config.kv_cache else None
        self.history: list[torch.LongTensor] = []
        self.nfe = 0
        self.steps_taken = 0
        self.done = False
        self._plan = _plan_tensor(blocks, device)
        if streamer is not None:  # an embedded prompt has no ids: an empty prompt keeps skip_prompt in step
            streamer.put(self.visible(x)[:, :0] if prompt_embeds is not None else x[:, :prompt_length].cpu())
        self._schedule_rows(self.active)
        self._advance()

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> torch.LongTensor:
        """Run one denoising step (steps 4-8 of `generate`) for the active rows; return the rows it finished."""
        request = self.plan_forward()
        return self.finish_step(request, self.run_forward(request))

    def plan_forward(self) -> ForwardRequest:
        """Step 4, before the model runs: the rows that take the step, their windows and the positions their forwards
        cover (the cache decides, row by row). `DiffusionEngine` runs several states' requests in shared passes."""
        if self.done:
            raise RuntimeError("This decoding state is done; read `output()` or start a new one.")
        block_start, block_end = self._row_blocks()
        length = self.x.shape[1]
        positions = torch.arange(length, device=self.x.device)
        masked = (self.x == self.mask_id) & (positions < block_end[:, None])
        # Rows with nothing left to commit up to their block's end sit the step out: their tokens cannot change,
        # and on a cohort that waits for its slowest row they would otherwise cost a forward at every step.
        rows = (self.active & masked.any(1)).nonzero().squeeze(1)
        start, end = block_start[rows], block_end[rows]
        # A row's window is its block (a fixed width: static shapes for torch.compile), or starts at an earlier mask
        # of the row (masks left in the prompt stay eligible, as in the official sampler).
        window_start = torch.minimum(start, torch.where(masked[rows], positions, length).min(1).values)
        key_end = torch.full_like(end, length)
        if self.config.canvas_tail is not None:  # a bounded canvas leaves out the masks far beyond the block
            key_end = (end + self.config.canvas_tail).clamp(max=length)
        if self.cache is None:
            query_start, query_end, cached = torch.zeros_like(rows), key_end, torch.zeros_like(rows, dtype=torch.bool)
        else:
            # A row refreshes its own keys at its block's first step (every `cache_refresh_interval`-th block), or
            # while a mask is left before its block. At the first step of the other blocks it recomputes only the
            # block before (its keys were computed before its last tokens were committed) and reuses the rest.
            first_step = self.row_block_step[rows] == 0
            refresh = first_step & self._refreshes_keys(rows) | (window_start < start)
            reuse = first_step & ~refresh
            query_from = torch.where(reuse, self._previous_block_start(rows), start)
            query_to = end
            if self.config.canvas_tail is not None:  # the bounded canvas grew since the refresh: its new tail runs too
                query_to = torch.where(reuse, key_end, end)
            query_start, query_end, cached = self.cache.query_range(rows * self.copies, refresh, query_from, query_to,
                                                                    key_end)
            self.cache.keep_rows(self._forward_rows(rows[cached]))  # the others leave or are stored again
        return ForwardRequest(self, rows, window_start, end, query_start, query_end, key_end, cached)

    def run_forward(self, request: ForwardRequest) -> torch.Tensor:
        """Step 4: the model on the request's rows; logits [R * copies, W, V] for each row's window (W: the widest)."""
        [logits], _ = _run_forwards(self.model, [request])
        return logits

    def finish_step(self, request: ForwardRequest, logits: torch.Tensor) -> torch.LongTensor:
        """Steps 4 (guidance) to 8 with the windows' logits; returns the rows this step finished."""
        rows, window_start, window_end = request.rows, request.window_start, request.window_end
        if self.copies == 2:  # each row's forward row is followed by its unconditional copy's
            logits = classifier_free_guidance(logits[0::2], logits[1::2], self.config.cfg_scale)
        self.nfe += request.passes
        self.forwards_taken[rows] += 1
        # Row r's window position j is its sequence position window_start[r] + j (past its window_end: not its window)
        columns = window_start[:, None] + torch.arange(logits.shape[1], device=self.x.device)  # [R, W]
        inside = columns < window_end[:, None]
        columns = columns.clamp(max=self.x.shape[1] - 1)
        current = self.x[rows[:, None], columns]
        # 5. Candidates
        logits = self._shape_logits(logits, rows, columns)
        candidates = _candidates(logits, self.config, self.generator)
        # 6. Scores: only masked positions of the window are eligible (and, once a stop token is committed, only
        # those before it)
        eligible = inside & (current == self.mask_id)
        if self.stop_ids is not None:
            eligible &= columns < self.stop_at[rows, None]
        scores = self._scores(logits, candidates, eligible)
        _check_finite(logits, candidates, scores, eligible, self.steps_taken)
        # 7. Commit the scheduled number of best candidates per row (more with parallel decoding or a learned policy)
        count = _parallel_count(scores, self.schedule[rows, self.row_block_step[rows]], self.config, logits)
        chosen = _top_k_per_row(scores, count, eligible, columns, self.x.shape[1])
        if self.policy is not None:  # a learned policy adds the positions it calls final (never fewer than scheduled)
            chosen |= self._policy_commits(logits, candidates, eligible, inside, rows, columns)
        committed_rows = rows[:, None].expand_as(columns)[chosen]
        self.x[committed_rows, columns[chosen]] = candidates[chosen]
        self.commit_step[committed_rows, columns[chosen]] = self.row_steps[committed_rows]
        self._count_step(rows)
        if self.stop_ids is not None:
            self._find_stops(rows)
        # 8. Report and stop
        if self.config.output_history:
            self.history.append(self.visible(self.x).clone())
        if self.streamer is not None and hasattr(self.streamer, "put_draft"):
            start = self.blocks[self.block_index].start  # the canvas: what `put` has not had
            self.streamer.put_draft(value=self.x[:, start:].cpu())
        finished = self._finished_rows() & self.active
        self._fill_with_eos(finished)
        self.active &= ~finished
        self._advance()
        return finished.nonzero().squeeze(1)

    def remove(self, rows: torch.LongTensor | list[int]) -> None:
        """Cancel rows (indices into this state's batch): they take no more forward passes; others are unchanged."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.x.device)
        self.active[rows] = False
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

    def row_output(self, index: int) -> torch.LongTensor:
        """Row `index`'s sequence as `generate` returns it for the rows added with it (without the columns that rows
        joining later added on its left)."""
        if self.prompt_embeds is not None:
            return self.x[index, self.answer_start :].clone()
        return self.x[index, int(self.position_offset[index]) :].clone()

    def steps_to_block_start(self) -> int:
        """Steps until the soonest active row runs a whole-canvas or block-first forward (0: the next step does; every
        step does without a cache), at most: a threshold may close a block sooner. A row that joins then shares that
        forward's shape instead of adding a pass (`DiffusionEngine.steps_to_block_start`)."""
        if self.cache is None or self.done:
            return 0
        steps = self._plan[2, self.row_block.clamp(max=len(self.blocks) - 1)]
        remaining = torch.where(self.row_block_step == 0, 0, steps - self.row_block_step)[self.active]
        return int(remaining.min()) if remaining.numel() else 0

    @property
    def answer_start(self) -> int:
        return self.prompt_length

    @property
    def block_index(self) -> int:
        """The first block a row still being decoded is in (every block is behind when none is)."""
        live = self.row_block[self.active]
        return int(live.min()) if live.numel() else len(self.blocks)

    def visible(self, x: torch.Tensor) -> torch.Tensor:
        """What the caller sees of a [B, L] tensor: everything, or the answer when the prompt was embedded."""
        return x[:, self.prompt_length :] if self.prompt_embeds is not None else x

    # ---- continuous batching: rows that join and leave ------------------------------------------------

    def can_join(self, other: "DiffusionDecodingState") -> bool:
        """Whether the rows of `other` (a state that has not stepped yet) can be decoded in this one: the same model,
        settings, block plan (relative to the answer) and generator, prompts of the same kind (ids or embeddings), and
        nothing that a caller reads for its own batch (streamer, logits processors, stopping criteria, history)."""
        return (not self.done and other.steps_taken == 0 and self.model is other.model
                and self.generator is other.generator and self._stands_alone() and other._stands_alone()
                and (self.prompt_embeds is None) == (other.prompt_embeds is None)
                and self._relative_plan() == other._relative_plan()
                and self._settings == other._settings)

    def join(self, other: "DiffusionDecodingState") -> int:
        """Take in the rows of `other` (see `can_join`) as a cohort of their own, left-padded to the longer prompt;
        they decode from the next step on, each as it would alone. Returns the index of `other`'s first row here."""
        wider = self.prompt_length - other.prompt_length
        (other if wider > 0 else self)._shift_columns(abs(wider))
        first = self.x.shape[0]
        if (self.attention_mask is None) != (other.attention_mask is None):
            self.attention_mask, other.attention_mask = self._mask_or_ones(), other._mask_or_ones()
        other.cohort += self.cohorts
        for name in _ROW_TENSORS:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, None if mine is None else torch.cat([mine, theirs]))
        self.cohorts += other.cohorts
        return first

    def keep(self, rows: torch.LongTensor) -> None:
        """Keep only `rows` (ascending; the others were popped or removed) and number them 0, 1, ...; then drop the
        columns that only padded rows no longer here."""
        if self.cache is not None:
            self.cache.renumber(self._forward_rows(rows))
        for name in _ROW_TENSORS:
            tensor = getattr(self, name)
            setattr(self, name, None if tensor is None else tensor[rows])
        cohorts, self.cohort = self.cohort.unique(return_inverse=True)
        self.cohorts = cohorts.numel()
        if rows.numel():
            self._shift_columns(-int(self.position_offset.min()))

    @functools.cached_property
    def _settings(self) -> dict:
        """The call's settings, to compare states (made once: a config's dict is a deep copy). Not
        `num_return_sequences`: the rows are repeated already, and each decodes as any other row."""
        settings = self.config.to_dict()
        settings.pop("num_return_sequences", None)
        return settings

    def _stands_alone(self) -> bool:
        return (self.streamer is None and not self.logits_processor and self.stopping_criteria is None
                and not self.config.output_history)

    def _relative_plan(self) -> list[tuple[int, int, int]]:
        start = self.prompt_length
        return [(block.start - start, block.end - start, block.steps) for block in self.blocks]

    def _mask_or_ones(self) -> torch.Tensor:
        return torch.ones_like(self.x) if self.attention_mask is None else self.attention_mask

    def _shift_columns(self, shift: int) -> None:
        """Add `shift` padding columns on the left of every row (a longer prompt joined), or remove -shift columns
        that pad every row; positions, blocks and cached keys move with the columns, and each row keeps its
        position ids."""
        if shift == 0:
            return
        if shift > 0:
            self.attention_mask = self._mask_or_ones()
        filler = -1 if self.prompt_embeds is not None else self.pad_id
        self.x = _shift_left(self.x, shift, filler)
        self.attention_mask = None if self.attention_mask is None else _shift_left(self.attention_mask, shift, 0)
        self.prompt_positions = _shift_left(self.prompt_positions, shift, True)
        self.commit_step = _shift_left(self.commit_step, shift, -1)
        if self.policy is not None:
            self.last_argmax = _shift_left(self.last_argmax, shift, -1)
            self.stable_steps = _shift_left(self.stable_steps, shift, 0)
        if self.prompt_embeds is not None:
            self.prompt_embeds = _shift_left(self.prompt_embeds, shift, 0.0)
        self.stop_at += shift
        self.position_offset += shift
        self.prompt_length += shift
        self.blocks = [Block(block.start + shift, block.end + shift, block.steps) for block in self.blocks]
        self._plan = _plan_tensor(self.blocks, self.x.device)
        if self.cache is not None:
            self.cache.shift_columns(shift)

    def _forward_rows(self, rows: torch.LongTensor) -> torch.LongTensor:
        """The forward rows of `rows`: each row, then (with CFG) its copy with the prompt masked."""
        copies = torch.arange(self.copies, device=rows.device)
        return (rows[:, None] * self.copies + copies).flatten()

    # ---- step 4: the model's inputs ------------------------------------------------------------

    def _query_inputs(self, forward_rows: torch.LongTensor, starts: torch.LongTensor, width: int) -> torch.Tensor:
        """The model inputs of `forward_rows` at positions [start, start + width): ids [n, width], or embeddings
        [n, width, D] when the prompt is embedded. CFG copies (odd forward rows) have their prompt masked; positions
        past the sequence (a pass shared with longer rows) hold padding."""
        rows = forward_rows // self.copies
        length = self.x.shape[1]
        columns = starts[:, None] + torch.arange(width, device=starts.device)  # [n, width]
        past_end = columns >= length
        columns = columns.clamp(max=length - 1)
        ids = self.x[rows[:, None], columns]
        if self.copies == 2:
            unconditional = (forward_rows % 2 == 1)[:, None] & self.prompt_positions[rows[:, None], columns]
            ids = ids.masked_fill(unconditional, self.mask_id)
        ids = ids.masked_fill(past_end, self.pad_id)
        if self.prompt_embeds is None:
            return ids
        # Prompt positions hold -1: they take the prompt's embeddings (the CFG copy's were masked above)
        embeds = self.model.get_input_embeddings()(ids.clamp(min=0))
        prompt = self.prompt_embeds[rows[:, None], columns.clamp(max=self.prompt_embeds.shape[1] - 1)]
        return torch.where((ids < 0)[..., None], prompt, embeds)

    def _key_mask(self, forward_rows: torch.LongTensor, key_end: torch.LongTensor, width: int) -> torch.Tensor:
        """[n, width]: 1 where a forward row may attend (its own tokens, up to its canvas end), 0 elsewhere."""
        within = (torch.arange(width, device=key_end.device) < key_end[:, None]).long()
        if self.attention_mask is None:
            return within
        mask = self.attention_mask[forward_rows // self.copies, :width]
        return F.pad(mask, (0, width - mask.shape[1])) * within

    # ---- steps 5-6: candidates and scores ------------------------------------------------------

    def _shape_logits(self, logits: torch.Tensor, rows: torch.LongTensor, columns: torch.LongTensor) -> torch.Tensor:
        """Apply user processors and the token suppressions (step 5), in the logits' own dtype; the strategies
        score these logits. `columns` [R, W]: each window position's place in the sequence."""
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
        begin = _token_ids(config.begin_suppress_tokens)
        if not (config.min_new_tokens or begin):  # the usual case: no per-position suppression this step
            return logits
        answer_position = columns - self.answer_start  # [R, W]
        if config.min_new_tokens:
            ends = _token_ids(config.eos_token_id) + _token_ids(config.eot_token_id)
            _forbid(logits, ends, (answer_position >= 0) & (answer_position < config.min_new_tokens))
        _forbid(logits, begin, answer_position == 0)
        return logits

    def _scores(self, logits: torch.Tensor, candidates: torch.LongTensor, eligible: torch.Tensor) -> torch.Tensor:
        """The strategy's scores [R, W]; -inf where nothing may be committed."""
        config = self.config
        if config.score_dtype is not None:
            logits = logits.to(getattr(torch, config.score_dtype))
        if config.confidence_eos_eot_inf:
            ends = _token_ids(config.eos_token_id) + _token_ids(config.eot_token_id)
            # The official rule: the EOS and EoT logits are -inf in the scores' softmax (after the candidates
            # were drawn), so the other candidates' probabilities are renormalised without them ...
            logits = logits.clone()
            _forbid(logits, ends)
            scores = self.strategy.score(logits, candidates, self.generator)
            # ... and EOS/EoT candidates come last, yet stay eligible, for every strategy (the official rule gives
            # them probability 0, the lowest low-confidence score).
            ended = torch.isin(candidates, _id_tensor(ends, candidates.device))
            scores = scores.masked_fill(ended, 0.0 if self.strategy.name == "low_confidence" else
                                        torch.finfo(scores.dtype).min)
        else:
            scores = self.strategy.score(logits, candidates, self.generator)
        return scores.masked_fill(~eligible, float("-inf"))

    # ---- step 7: a learned policy's commits -----------------------------------------------------

    def _policy_commits(self, logits: torch.Tensor, candidates: torch.LongTensor, eligible: torch.Tensor,
                        inside: torch.Tensor, rows: torch.LongTensor, columns: torch.LongTensor) -> torch.Tensor:
        """[R, W] the eligible positions the policy commits beyond the schedule: those it calls final, and every one of
        a row whose block it calls done. Updates each window position's argmax-stable counter first."""
        argmax = candidates if not self.config.temperature or self.config.do_sample is False else logits.argmax(-1)
        where = (rows[:, None].expand_as(columns)[inside], columns[inside])
        stable = torch.where(argmax == self.last_argmax[rows[:, None], columns],
                             self.stable_steps[rows[:, None], columns] + 1, 0)
        self.last_argmax[where], self.stable_steps[where] = argmax[inside], stable[inside]
        block_start, block_end = self._row_blocks()
        block_steps = self._plan[2, self.row_block[rows].clamp(max=len(self.blocks) - 1)]
        signals = StepSignals(rows, logits, candidates, eligible, columns, block_start[rows], block_end[rows],
                              self.row_block_step[rows], block_steps, stable)
        commit, done = self.policy.decide(signals)
        if commit.shape != eligible.shape or done.shape != rows.shape:
            raise ValueError(f"{type(self.policy).__name__}.decide returned commit {tuple(commit.shape)} and done "
                             f"{tuple(done.shape)}; expected {tuple(eligible.shape)} and {tuple(rows.shape)} (rows, "
                             "window positions).")
        if self.config.confidence_eos_eot_inf:  # EOS/EoT only when nothing else is left: not before the block is done
            commit = commit & ~torch.isin(candidates, _id_tensor(
                _token_ids(self.config.eos_token_id) + _token_ids(self.config.eot_token_id), candidates.device))
        return eligible & (commit.bool() | done.bool()[:, None])

    # ---- step 8: finishing rows ----------------------------------------------------------------

    def _find_stops(self, rows: torch.LongTensor) -> None:
        """The official LLaDA-V stop rule, its scan: after each step the answer is searched for the stop tokens,
        and a row's stop is the earliest committed one (it can only move earlier)."""
        answer = self.x[rows, self.answer_start :]
        positions = torch.arange(self.answer_start, self.x.shape[1], device=self.x.device)
        found = torch.where(torch.isin(answer, self.stop_ids), positions, self.x.shape[1]).min(1).values
        self.stop_at[rows] = torch.minimum(self.stop_at[rows], found)

    def _finished_rows(self) -> torch.Tensor:
        """Rows whose answer is decided up to an EOS (early exit) or up to a stop token (`stop_token_ids`), or that
        a stopping criterion ends."""
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
        if self.stop_ids is not None:
            before_stop = torch.arange(x.shape[1], device=x.device) < self.stop_at[:, None]
            finished |= (self.stop_at < x.shape[1]) & ~((x == self.mask_id) & before_stop).any(1)
        if self.stopping_criteria is not None:
            finished |= self.stopping_criteria(self.visible(x), None).to(x.device)
        return finished

    def _fill_with_eos(self, rows: torch.Tensor) -> None:
        """The finished rows' answers end here: their masks, and whatever follows a stop token, become EOS."""
        if not bool(rows.any()) or self.config.eos_token_id is None:
            return
        eos = _token_ids(self.config.eos_token_id)[0]
        after_stop = torch.arange(self.x.shape[1], device=self.x.device) > self.stop_at[:, None]
        ended = rows[:, None] & ((self.x == self.mask_id) | after_stop)
        ended[:, : self.answer_start] = False
        self.x[ended] = eos

    # ---- blocks: each cohort's progress --------------------------------------------------------

    def _refreshes_keys(self, rows: torch.LongTensor) -> torch.Tensor:
        """Per row: whether its current block starts with a full pass (every `cache_refresh_interval`-th block)."""
        return self.row_block[rows] % (self.config.cache_refresh_interval or 1) == 0

    def _previous_block_start(self, rows: torch.LongTensor) -> torch.LongTensor:
        return self._plan[0, (self.row_block[rows] - 1).clamp(min=0)]

    def _row_blocks(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """[B] each row's current block start and end (the last block's for rows past it)."""
        block = self.row_block.clamp(max=len(self.blocks) - 1)
        return self._plan[0, block], self._plan[1, block]

    def _count_step(self, rows: torch.LongTensor) -> None:
        """The cohorts of `rows` took a step (their rows that sat it out count it too, as a batch of `generate`)."""
        took = torch.isin(self.cohort, self.cohort[rows])
        self.row_block_step += took
        self.row_steps += took
        self.steps_taken += 1

    def _advance(self) -> None:
        """Close the blocks that have nothing left to do, cohort by cohort (steps spent, or no mask left up to the
        block's end in any of the cohort's active rows); a row past its last block is finished, and the state is done
        when no row is active.

        Each block's schedule spreads its masks over its steps; the first block's also counts masks left before it
        (masks inside the prompt), so every mask of the sequence is committed by the end.
        """
        while True:
            closing = self._closing_rows()
            if not bool(closing.any()):
                break
            self._stream_block(closing)
            self.row_block += closing
            self.row_block_step[closing] = 0
            past_the_plan = closing & (self.row_block == len(self.blocks))
            self.active &= ~past_the_plan
            self._schedule_rows(closing & ~past_the_plan)
        if not self.done and not bool(self.active.any()):
            self.done = True
            if self.streamer is not None:
                if self._block_in_progress() is not None:  # rows ended early: their block is what they stop at
                    self._stream_block(torch.ones_like(self.active))
                self.streamer.end()

    def _closing_rows(self) -> torch.Tensor:
        """[B] the active rows whose cohort is done with its current block."""
        _, block_end = self._row_blocks()
        positions = torch.arange(self.x.shape[1], device=self.x.device)
        has_masks = self.active & ((self.x == self.mask_id) & (positions < block_end[:, None])).any(1)
        busy = torch.zeros(self.cohorts, dtype=torch.bool, device=self.x.device)
        busy[self.cohort[has_masks]] = True
        steps = self._plan[2, self.row_block.clamp(max=len(self.blocks) - 1)]
        return self.active & ((self.row_block_step >= steps) | ~busy[self.cohort])

    def _schedule_rows(self, rows: torch.Tensor) -> None:
        """The schedule of the block that `rows` ([B] booleans) enter: how many tokens each of its steps commits."""
        rows = rows.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        block = self.row_block[rows]
        start = torch.where(block == 0, 0, self._plan[0, block])  # block 0 also commits masks left in the prompt
        positions = torch.arange(self.x.shape[1], device=self.x.device)
        in_block = (positions >= start[:, None]) & (positions < self._plan[1, block][:, None])
        counts = tokens_per_step(((self.x[rows] == self.mask_id) & in_block).sum(1), self._plan[2, block])
        self.schedule[rows] = F.pad(counts, (0, self.schedule.shape[1] - counts.shape[1]))

    def _block_in_progress(self) -> int | None:
        """The block the streamer's rows are in, while it is not behind them."""
        block = int(self.row_block.min())
        return block if block < len(self.blocks) else None

    def _stream_block(self, rows: torch.Tensor) -> None:
        """A streamer gets each block as its cohort closes it (a state with a streamer holds one cohort)."""
        if self.streamer is None:
            return
        block = self.blocks[int(self.row_block[rows].min())]
        self.streamer.put(self.x[:, block.start : block.end].cpu())


# Per-row tensors of a decoding state: what `join` concatenates and `keep` selects.
_ROW_TENSORS = ("x", "attention_mask", "prompt_embeds", "prompt_positions", "active", "stop_at",
                "commit_step", "forwards_taken", "cohort", "row_block", "row_block_step", "row_steps", "schedule",
                "position_offset", "last_argmax", "stable_steps")


def _plan_tensor(blocks: list[Block], device) -> torch.LongTensor:
    """[3, blocks]: each block's start, end and steps."""
    return torch.tensor([[b.start for b in blocks], [b.end for b in blocks], [b.steps for b in blocks]],
                        dtype=torch.long, device=device)


def _shift_left(tensor: torch.Tensor, shift: int, fill) -> torch.Tensor:
    """[B, L, ...] with `shift` columns of `fill` added on the left (or -shift columns removed)."""
    if shift < 0:
        return tensor[:, -shift:]
    return torch.cat([tensor.new_full((tensor.shape[0], shift, *tensor.shape[2:]), fill), tensor], dim=1)


def _pad_id(config: GenerationConfig) -> int:
    """An id for the positions a row does not use: the pad (or EOS) id, never the mask (it would be decoded)."""
    for candidate in (config.pad_token_id, *_token_ids(config.eos_token_id), 0, 1):
        if candidate is not None and candidate != config.mask_token_id:
            return candidate


# --------------------------------------------------------------------------------------------------
# Shared forward passes: the rows of every state that takes a step, in as few passes as their shapes allow
# --------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """Forward rows of one request that run in the same pass: their places in the request's logits (`slots`), their
    queries (`width` positions from `query_start`; width 0: the whole canvas), canvas ends and window offsets."""

    request: ForwardRequest
    width: int
    slots: torch.LongTensor
    rows: torch.LongTensor  # the state's forward rows
    query_start: torch.LongTensor
    key_end: torch.LongTensor
    query_starts: list[int]  # the same two, on the host
    key_ends: list[int]
    window_offsets: list[int]  # window start - query start, per forward row
    window_width: int  # the widest window

    @property
    def state(self) -> "DiffusionDecodingState":
        return self.request.state


def _run_forwards(model, requests: list[ForwardRequest]) -> tuple[list[torch.Tensor], int]:
    """Run the forwards of several states' steps in as few passes as their shapes allow: every row that runs its
    whole canvas (no cache, or a refresh) shares one pass, shorter canvases padded on the right and masked; the rows
    that read their cache share a pass per query width (a dual-cache block, or a prefix run from the block on). Each
    row keeps its own position ids, so it sees what it sees alone.

    Returns each request's window logits ([forward rows, its widest window, V]; positions past a row's window are
    zeros) and the number of passes run; sets each request's `passes`. Cached passes run first: a refresh stores
    keys after them.
    """
    groups: dict[int, list[_Piece]] = {}
    widest = {}  # each request's widest window
    for request in requests:
        pieces = _pieces(request)
        widest[id(request)] = max(piece.window_width for piece in pieces)
        for piece in pieces:
            groups.setdefault(piece.width, []).append(piece)
    parts: dict[int, list[tuple[torch.LongTensor, torch.Tensor]]] = {id(request): [] for request in requests}
    for width in sorted(groups, reverse=True):  # the whole-canvas pass (width 0) last
        pieces = groups[width]
        for piece, logits in zip(pieces, _run_pass(model, width, pieces)):
            parts[id(piece.request)].append((piece.slots, logits))
        for request in {id(piece.request): piece.request for piece in pieces}.values():
            request.passes += 1
    logits = [_assemble(request, parts[id(request)], widest[id(request)]) for request in requests]
    return logits, len(groups)


def _pieces(request: ForwardRequest) -> list[_Piece]:
    """The request's forward rows, split by the pass they run in."""
    copies = request.state.copies
    per_row = (request.query_start, request.query_end, request.key_end, request.window_start, request.window_end,
               request.cached)
    if copies > 1:  # a row's CFG copy runs where the row runs
        per_row = tuple(value.repeat_interleave(copies) for value in per_row)
    start, end, key_end, window_start, window_end, cached = per_row
    forward_rows = request.state._forward_rows(request.rows)
    widths = torch.where(cached, end - start, 0)
    host = torch.stack([widths, start, key_end, window_start - start, window_end - window_start]).tolist()
    pieces = []
    for width in sorted(set(host[0])):
        slots = [i for i, row_width in enumerate(host[0]) if row_width == width]
        index = torch.tensor(slots, device=forward_rows.device)
        starts, key_ends, offsets, window_widths = ([values[i] for i in slots] for values in host[1:])
        pieces.append(_Piece(request, width, index, forward_rows[index], start[index], key_end[index], starts,
                             key_ends, offsets, max(window_widths)))
    return pieces


def _run_pass(model, width: int, pieces: list[_Piece]) -> list[torch.Tensor]:
    """One forward pass for `pieces` (queries `width` wide, or each row's whole canvas when 0); returns each piece's
    window logits."""
    query_width = width or max(max(piece.key_ends) for piece in pieces)
    inputs = [piece.state._query_inputs(piece.rows, piece.query_start, query_width) for piece in pieces]
    embedded = any(tensor.dim() == 3 for tensor in inputs)
    if embedded:  # ids are embedded as the model would embed them
        inputs = [tensor if tensor.dim() == 3 else model.get_input_embeddings()(tensor) for tensor in inputs]
    positions = torch.cat([  # each row's own position ids
        piece.query_start[:, None] + torch.arange(query_width, device=piece.rows.device)
        - piece.state.position_offset[piece.rows // piece.state.copies, None] for piece in pieces])
    cache, shared = _pass_cache(pieces, width)
    key_width = query_width if width == 0 else cache.layers[0].keys.shape[-2]
    logits = model(**{"inputs_embeds" if embedded else "input_ids": torch.cat(inputs)},
                   attention_mask=_pass_key_mask(pieces, key_width), position_ids=positions, cache=cache,
                   logits_to_keep=_window_positions(pieces, query_width), check_input_ids=False).logits
    if shared:
        _keep_pass_keys(pieces, width, cache)
    sizes = [len(piece.rows) for piece in pieces]
    return list(logits.split(sizes)) if len(pieces) > 1 else [logits]


def _pass_cache(pieces: list[_Piece], width: int) -> tuple[DiffusionCache | None, bool]:
    """The cache a pass runs with, and whether it is one made for the pass (its keys go back to the states' caches
    afterwards) rather than a state's own. A state alone in its pass uses its own cache, as `generate` does."""
    states = [piece.state for piece in pieces if piece.state.cache is not None]
    if not states:
        return None, False
    if len(pieces) == 1 and _owns_the_pass(pieces[0], width):
        piece, cache = pieces[0], pieces[0].state.cache
        if width == 0:
            cache.start_refill(piece.rows)
            cache.set_query_start(0)
        else:
            uniform = len(set(piece.query_starts)) == 1
            cache.reserve(max(piece.key_ends))
            cache.set_query_start(piece.query_starts[0] if uniform else piece.query_start)
        return cache, False
    cache = DiffusionCache()
    if width == 0:
        cache.set_query_start(0)  # a full pass: it keeps every row's keys, for the refreshing rows to store
        return cache, True
    key_width = max(max(piece.key_ends) for piece in pieces)
    gathered = [piece.state.cache.gather(piece.rows, key_width) for piece in pieces]
    cache.store(torch.arange(sum(len(piece.rows) for piece in pieces), device=pieces[0].rows.device),
                [(torch.cat([keys for keys, _ in layer]), torch.cat([values for _, values in layer]))
                 for layer in zip(*gathered)])
    cache.set_query_start(torch.cat([piece.query_start for piece in pieces]))
    return cache, True


def _owns_the_pass(piece: _Piece, width: int) -> bool:
    """Whether the state's own cache can serve the pass: a full pass refills it when it holds no row that reads it
    this step; a cached pass reads it when it holds exactly the pass's rows."""
    cache = piece.state.cache
    if width == 0:
        return cache.rows is None or cache.rows.numel() == 0
    return cache.rows is not None and torch.equal(cache.rows, piece.rows)


def _keep_pass_keys(pieces: list[_Piece], width: int, cache: DiffusionCache) -> None:
    """After a pass with a cache of its own: refreshed rows store their keys/values in their states' caches, rows that
    read their cache write back the positions the pass ran."""
    first = 0
    for piece in pieces:
        rows = slice(first, first + len(piece.rows))
        first += len(piece.rows)
        state_cache = piece.state.cache
        if state_cache is None:
            continue
        if width == 0:
            length = piece.state.x.shape[1]
            state_cache.store(piece.rows, [(layer.keys[rows, :, :length].clone(),
                                            layer.values[rows, :, :length].clone()) for layer in cache.layers])
        else:
            state_cache.reserve(max(piece.key_ends))
            state_cache.write_columns(piece.rows, piece.query_start, width,
                                      [(layer.keys[rows], layer.values[rows]) for layer in cache.layers])


def _pass_key_mask(pieces: list[_Piece], key_width: int) -> torch.Tensor | None:
    """The pass's attention mask [rows, key_width], or None when every row attends to every position."""
    if all(piece.state.attention_mask is None and min(piece.key_ends) == key_width for piece in pieces):
        return None
    return torch.cat([piece.state._key_mask(piece.rows, piece.key_end, key_width) for piece in pieces])


def _window_positions(pieces: list[_Piece], query_width: int) -> torch.Tensor:
    """`logits_to_keep` of a pass: the windows' positions among the queries, one list for every row when the windows
    line up (the usual case, and static shapes), else one per row ([rows, widest window])."""
    offsets = [offset for piece in pieces for offset in piece.window_offsets]
    width = max(piece.window_width for piece in pieces)
    device = pieces[0].rows.device
    if len(set(offsets)) == 1:
        return torch.arange(offsets[0], offsets[0] + width, device=device)
    positions = torch.tensor(offsets, device=device)[:, None] + torch.arange(width, device=device)
    return positions.clamp(max=query_width - 1)


def _assemble(request: ForwardRequest, parts: list[tuple[torch.LongTensor, torch.Tensor]], width: int
              ) -> torch.Tensor:
    """The request's window logits ([forward rows, `width` = its widest window, V]; zeros past a row's window) from
    its pieces' (places in the request, logits)."""
    rows = len(request.rows) * request.state.copies
    if len(parts) == 1 and len(parts[0][0]) == rows and parts[0][1].shape[1] == width:
        return parts[0][1]
    logits = parts[0][1]
    out = logits.new_zeros(rows, width, logits.shape[-1])
    for slots, piece_logits in parts:
        kept = min(width, piece_logits.shape[1])
        out[slots, :kept] = piece_logits[:, :kept]
    return out


class DiffusionEngine:
    """Continuous batching: requests come and go between steps, and every request decodes with the others
    whatever its arrival time and settings.

    `add` takes `generate`'s arguments; the rows join a running state with the same settings (a cohort of their
    own, at its own block and step: the per-row work of a step is batched with the state's other rows) or start a
    state of their own. `step()` advances every request by one denoising step, the rows of all states in as few
    forward passes as their shapes allow: every row that runs its whole canvas (no cache, or a refresh of its own
    keys) in one pass, the rows that read their caches in one pass per query width, each row with its own position
    ids. Finished or cancelled rows leave without changing the other rows' tokens: every request gets the tokens it
    would get from `generate` alone. `forward_passes` counts the passes run.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.decoding_llada import DiffusionEngine
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
        self._left: list[DiffusionDecodingState] = []  # states with rows popped or removed since the last step
        self._next_id = 0
        self.forward_passes = 0

    def add(self, input_ids=None, attention_mask=None, join: bool = True, **kwargs) -> list[int]:
        """Add requests (the arguments of `generate`); returns one id per row, used by `pop`, `draft`, `remove`.
        With `join=False` the rows keep a state of their own (they still share forward passes)."""
        state = self.model.prepare_decoding(input_ids, attention_mask, **kwargs)
        rows = state.x.shape[0]
        host = next((running for running in self.states if join and running.can_join(state)), None)
        first = 0 if host is None else host.join(state)
        if host is None:
            host = state
            self.states.append(state)
        ids = list(range(self._next_id, self._next_id + rows))
        self._next_id += rows
        for index, row_id in enumerate(ids):
            self._rows[row_id] = (host, first + index)
        return ids

    @property
    def has_unfinished(self) -> bool:
        return any(not state.done for state in self.states)

    def steps_to_block_start(self) -> int | None:
        """Steps until some running row starts a block (0: at the next step), None when nothing runs. With caches, a
        request added at that step runs its first (whole-canvas) forward in the pass of the rows that refresh,
        and moves through its blocks in phase with them afterwards: one pass per step instead of two. A server can
        hold a request back until then (`llada-hf serve --join-wait`)."""
        pending = [state.steps_to_block_start() for state in self.states if not state.done]
        return min(pending) if pending else None

    def step(self) -> list[int]:
        """One denoising step for every unfinished request; returns the ids of the rows finished by now."""
        self._compact()
        pending = [state for state in self.states if not state.done]
        requests = [state.plan_forward() for state in pending]
        logits, passes = _run_forwards(self.model, requests)
        for state, request, window_logits in zip(pending, requests, logits):
            state.finish_step(request, window_logits)
        self.forward_passes += passes
        return [row_id for row_id in self._rows if self.is_finished(row_id)]

    def is_finished(self, row_id: int) -> bool:
        state, index = self._rows[row_id]
        return state.done or not bool(state.active[index])

    def state_of(self, row_id: int) -> tuple[DiffusionDecodingState, int]:
        """The state that decodes the row, and the row's index in its batch (until the next step): a caller that
        follows many rows reads each state once (one device-to-host copy) instead of once per row."""
        return self._rows[row_id]

    def draft(self, row_id: int) -> torch.LongTensor:
        """The row's current answer, masks still in place ([answer])."""
        state, index = self._rows[row_id]
        return state.x[index, state.answer_start :].clone()

    def pop(self, row_id: int) -> torch.LongTensor:
        """The finished row's sequence (as `generate` returns it, one row); the engine forgets the row."""
        if not self.is_finished(row_id):
            raise ValueError(f"Row {row_id} is still being decoded; call `step()` until `is_finished({row_id})`.")
        state, index = self._rows.pop(row_id)
        self._forget(state)
        return state.row_output(index)

    def remove(self, row_id: int) -> None:
        """Cancel a row: it takes no more forward passes and is forgotten; the other rows are unchanged."""
        state, index = self._rows.pop(row_id)
        if not state.done:
            state.remove([index])
        self._forget(state)

    def _forget(self, state: DiffusionDecodingState) -> None:
        """A row of `state` left: the state drops it at the next step, or goes when it has no row left."""
        if any(held is state for held, _ in self._rows.values()):
            self._left.append(state)
        else:
            self.states = [kept for kept in self.states if kept is not state]

    def _compact(self) -> None:
        """Drop the rows that left since the last step from their states, and renumber the rows that stay."""
        for state in {id(state): state for state in self._left if state in self.states}.values():
            ids = sorted((index, row_id) for row_id, (held, index) in self._rows.items() if held is state)
            state.keep(torch.tensor([index for index, _ in ids], dtype=torch.long, device=state.x.device))
            for new_index, (_, row_id) in enumerate(ids):
                self._rows[row_id] = (state, new_index)
        self._left = []


__all__ = [
    "RemaskingStrategy",
    "LowConfidenceRemasking",
    "RandomRemasking",
    "MarginRemasking",
    "EntropyRemasking",
    "REMASKING_STRATEGIES",
    "register_remasking_strategy",
    "resolve_strategy",
    "Block",
    "plan_blocks",
    "tokens_per_step",
    "classifier_free_guidance",
    "left_pad",
    "DiffusionGenerationOutput",
    "ForwardRequest",
    "DiffusionDecodingState",
    "DiffusionEngine",
]
