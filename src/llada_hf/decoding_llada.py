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
  at the first step of a block the model runs the whole sequence, later steps only the block and what follows
  it ("prefix") or only the block ("dual"). The cache decides each forward's query range (`query_range`).
- *Candidates, scores, commits*: plain functions of tensors, including parallel decoding
  (`confidence_threshold`, `parallel_factor`, `entropy_bound`) and the official tie-breaking.
- *The step engine*: `DiffusionDecodingState` (rows added together; `step()` = `plan_forward` ->
  `run_forward` -> `finish_step`) and `DiffusionEngine` (requests join and leave between steps; states
  without a cache share one forward pass).
"""

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


def tokens_per_step(num_masked: torch.LongTensor, steps: int) -> torch.LongTensor:
    """How many tokens each step commits, per row: [B] masks over `steps` steps -> [B, steps].

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
        # `stop_token_ids`: per row, the position of its earliest committed stop token (the sequence's length when
        # there is none yet)
        stop_ids = _token_ids(config.stop_token_ids)
        self.stop_ids = _id_tensor(stop_ids, x.device) if stop_ids else None
        self.stop_at = torch.full_like(self.active, x.shape[1], dtype=torch.long)
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
        # Rows with nothing left to commit up to the block's end sit the step out: their tokens cannot change,
        # and on a batch that waits for its slowest row they would otherwise cost a forward at every step.
        masked = self.x[:, : block.end] == self.mask_id
        rows = (self.active & masked.any(1)).nonzero().squeeze(1)
        # The window is the whole block (a fixed width: static shapes for torch.compile), or starts at an
        # earlier mask of any row (masks left in the prompt stay eligible, as in the official sampler).
        window_start = min(block.start, int(masked[rows].any(0).nonzero()[0]))
        guided = self.config.cfg_scale > 0
        length = self.x.shape[1]
        if self.config.canvas_tail is not None:  # a bounded canvas: masks far beyond the block are left out
            length = min(length, block.end + self.config.canvas_tail)
        batch_rows = torch.cat([rows, rows + self.x.shape[0]]) if guided else rows  # CFG copies: rows of their own
        start, end = 0, length
        if self.cache is not None:
            start, end = self.cache.query_range(batch_rows, window_start=window_start, block_start=block.start,
                                                block_end=block.end, refresh=self.block_step == 0, length=length)
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
                          logits_to_keep=keep, check_input_ids=False).logits

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
        # 6. Scores: only masked positions of the window are eligible (and, once a stop token is committed, only
        # those before it)
        eligible = self.x[rows, window_start : block.end] == self.mask_id
        if self.stop_ids is not None:
            positions = torch.arange(window_start, block.end, device=self.x.device)
            eligible &= positions < self.stop_at[rows, None]
        scores = self._scores(logits, candidates, eligible)
        _check_finite(logits, candidates, scores, eligible, self.steps_taken)
        # 7. Commit the scheduled number of best candidates per row (more with parallel decoding)
        count = _parallel_count(scores, self.schedule[rows, self.block_step], self.config, logits)
        chosen = _top_k_per_row(scores, count, eligible, window_start, self.x.shape[1])
        window = slice(window_start, block.end)
        self.x[rows, window] = torch.where(chosen, candidates, self.x[rows, window])
        self.commit_step[rows, window] = torch.where(chosen, self.steps_taken, self.commit_step[rows, window])
        self.block_step += 1
        self.steps_taken += 1
        if self.stop_ids is not None:
            self._find_stops(rows)
        # 8. Report and stop
        if self.config.output_history:
            self.history.append(self.visible(self.x).clone())
        if self.streamer is not None and hasattr(self.streamer, "put_draft"):
            self.streamer.put_draft(value=self.x[:, block.start :].cpu())  # the canvas: what `put` has not had
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
            has_masks = rows.numel() and bool((self.x[rows, : block.end] == self.mask_id).any())
            if self.block_step < block.steps and has_masks:
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
        begin = _token_ids(config.begin_suppress_tokens)
        if not (config.min_new_tokens or begin):  # the usual case: no per-position suppression this step
            return logits
        answer_position = torch.arange(window_start, window_end, device=logits.device) - self.answer_start  # [W]
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
                   logits_to_keep=torch.arange(low, high, device=inputs[0].device),
                   check_input_ids=False).logits  # [N, high - low, V]; ids as in `run_forward`, pad id 0
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

    def state_of(self, row_id: int) -> tuple[DiffusionDecodingState, int]:
        """The state that decodes the row, and the row's index in its batch: a caller that follows many rows reads
        each state once (one device-to-host copy) instead of once per row."""
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
