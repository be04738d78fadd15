"""Conditional likelihood of an answer under a masked diffusion model.

A masked diffusion model has no left-to-right factorisation, so log p(answer | prompt) is scored by
its evidence lower bound (ELBO), estimated by Monte Carlo exactly as the official LLaDA evaluation does
(docs/LLADA.md section 4):

1. Repeat prompt + answer over the rows of a *group* (`batch_size` rows; the last group of a pair
   takes the remainder when `mc_num` is not a multiple of `batch_size`).
2. Draw k uniformly from 1..L (L = answer length) once per group; row j of an n-row group masks
   l_j answer tokens, l_j = ((round(k + j*L/n) - 1) mod L) + 1: the mask ratios are spread evenly
   (stratified) over 1..L. The prompt is never masked.
3. Which l_j answer tokens are masked is uniform at random.
4. A row scores (L / l_j) * sum of the cross-entropies at its masked positions; the estimate is minus
   the mean over all rows.

Unlike the official code (one pair at a time), rows of several pairs share a forward pass here:
pairs of similar length are left-padded into one batch, and only the answer slots go through the
LM head (`logits_to_keep`). The random draws happen on the CPU, so results do not depend on the device.
The mask schedule, the masks and the row losses are `llada_hf.elbo`'s, shared with the preference trainer.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..decoding_llada import classifier_free_guidance, left_pad
from ..elbo import masked_row_losses, official_mask_counts, random_masks_with_counts


TokenIds = Sequence[int] | torch.Tensor | str


@dataclass
class _Pair:
    """One (prompt, answer) pair as token ids, with its position in the caller's list."""

    index: int
    prompt: list[int]
    answer: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.answer)


@dataclass
class _Group:
    """`rows` Monte-Carlo rows of one pair that share one draw of k (one stratified group)."""

    pair: _Pair
    rows: int


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def log_likelihood(
    model,
    prompts: Sequence[TokenIds],
    answers: Sequence[TokenIds],
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    tokenizer=None,
    return_stderr: bool = False,
    balanced_masks: bool = False,
) -> list[float] | tuple[list[float], list[float]]:
    """Monte-Carlo ELBO estimate of log p(answer | prompt) for each (prompt, answer) pair.

    Args:
        model: a `LladaForMaskedDiffusion` (or any model with the same `forward` and `config.mask_token_id`).
        prompts, answers: equally long lists; each item a list of token ids, a 1-D integer tensor, or a
            string when `tokenizer` is given (prompt and answer are then encoded separately, without
            special tokens). Prompts may be empty; answers may not.
        mc_num: Monte-Carlo rows per pair (official default 128). An answer of one token is scored
            exactly with a single row, because every row would be the same.
        batch_size: rows per forward pass, and the size of one stratified group of mask ratios (as in
            the official code). With `cfg_scale > 0` each forward pass holds twice as many rows.
        cfg_scale: unsupervised classifier-free guidance w: logits u + (w + 1)(c - u), where u comes from a
            copy whose prompt is fully masked. 0 turns it off.
        generator: a CPU `torch.Generator` for reproducible masks (default: torch's global one).
        tokenizer: encodes string prompts/answers.
        return_stderr: also return each estimate's standard error, from the spread of its groups' means
            (groups are independent; rows inside one are not). Needs at least two groups
            (`mc_num > batch_size`) for answers longer than one token.
        balanced_masks: variance reduction. The rows of a group share one random order of the answer
            tokens and mask consecutive (cyclic) windows of it, so every answer token is masked about
            equally often in a group. Each row alone is still a uniform random subset of its size, so the
            expectation is unchanged. Measured spread of the estimate (standard deviation over repeated
            estimates, mc_num 32-96, batch_size 16): LLaDA trained on the poem couplets, answers of about
            6 tokens: 2.1x smaller (`benchmarks/bench_reversal_poems.py`); random tiny model: 3.8x smaller
            for a 3-token answer, 1.3x for an 8-token one. It helps most when answer tokens differ in
            difficulty; the forward passes are the same.

    Returns:
        One float per pair (the estimated log-likelihood, higher = more likely); with `return_stderr`,
        a tuple (estimates, standard errors).

    Note:
        The official schedule uses `torch.round` (halves go to the even integer), so for many (L, n)
        the mask counts are not exactly uniform over 1..L and the expectation differs slightly from the
        true ELBO. We reproduce it as is, so that numbers match the official evaluation.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.evaluation import log_likelihood
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> model = LladaForMaskedDiffusion(config).eval()
        >>> scores = log_likelihood(model, [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], mc_num=32, batch_size=8,
        ...                         generator=torch.Generator().manual_seed(0))
        >>> len(scores), all(s < 0 for s in scores)
        (2, True)
        ```
    """
    pairs = _prepare_pairs(model, prompts, answers, tokenizer)
    _check_positive(mc_num=mc_num, batch_size=batch_size)
    _check_cfg_scale(cfg_scale)
    if return_stderr and mc_num <= batch_size and any(len(p.answer) > 1 for p in pairs):
        raise ValueError(
            f"A standard error needs at least two independent groups of rows: raise `mc_num` ({mc_num}) above "
            f"`batch_size` ({batch_size})."
        )

    groups = _plan_groups(pairs, mc_num, batch_size)
    row_losses: dict[int, list[torch.Tensor]] = {p.index: [] for p in pairs}  # per pair: one tensor per group
    for chunk in _pack(groups, batch_size):
        for group, losses in zip(chunk, _chunk_row_losses(model, chunk, cfg_scale, generator, balanced_masks)):
            row_losses[group.pair.index].append(losses)

    estimates, stderrs = [], []
    for pair in pairs:
        estimate, stderr = _combine_groups(row_losses[pair.index])
        estimates.append(-estimate)
        stderrs.append(stderr)
    return (estimates, stderrs) if return_stderr else estimates


@torch.no_grad()
def greedy_match(
    model,
    prompts: Sequence[TokenIds],
    answers: Sequence[TokenIds],
    *,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    tokenizer=None,
) -> list[bool]:
    """Whether each answer is what the model decodes greedily, one token per step (official
    `suffix_greedy_prediction`).

    The answer slot starts fully masked after the prompt; each step predicts every masked slot
    (argmax) and commits only the most confident one (softmax probability), until none is left.

    Args:
        model, prompts, answers, tokenizer, cfg_scale: as in `log_likelihood`.
        batch_size: pairs decoded together in one forward pass.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.evaluation import greedy_match
        >>> _ = torch.manual_seed(0)
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> model = LladaForMaskedDiffusion(config).eval()
        >>> greedy_match(model, [[5, 6, 7]], [[9, 10]])
        [False]
        ```
    """
    pairs = _prepare_pairs(model, prompts, answers, tokenizer)
    _check_positive(batch_size=batch_size)
    _check_cfg_scale(cfg_scale)
    matches = [False] * len(pairs)
    for chunk in _chunks(sorted(pairs, key=lambda p: p.length), batch_size):
        for pair, match in zip(chunk, _greedy_decode_matches(model, chunk, cfg_scale)):
            matches[pair.index] = match
    return matches


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _prepare_pairs(model, prompts, answers, tokenizer) -> list[_Pair]:
    for name, items in (("prompts", prompts), ("answers", answers)):
        if isinstance(items, str):  # a string is a sequence too: its characters would be scored as pairs
            raise TypeError(f"`{name}` is one string; pass a list with one item per pair, e.g. [{items[:20]!r}].")
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt.")
    if len(prompts) == 0:
        raise ValueError("`prompts` and `answers` are empty; pass at least one (prompt, answer) pair.")
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise ValueError("`model.config.mask_token_id` is not set; the estimator needs the mask token.")
    context = getattr(model.config, "max_position_embeddings", None)
    vocab_size = model.config.vocab_size
    pairs = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        pair = _Pair(i, _token_ids(prompt, tokenizer, f"prompts[{i}]"), _token_ids(answer, tokenizer, f"answers[{i}]"))
        if not pair.answer:
            raise ValueError(f"answers[{i}] is empty: there is nothing to score.")
        if mask_id in pair.answer:
            raise ValueError(f"answers[{i}] contains the mask token id {mask_id}; an answer must be real text.")
        for name, ids in ((f"prompts[{i}]", pair.prompt), (f"answers[{i}]", pair.answer)):
            outside = [token for token in ids if not 0 <= token < vocab_size]
            if outside:
                raise ValueError(
                    f"{name} holds the token id {outside[0]}, outside the model's vocabulary [0, {vocab_size}); "
                    "encode it with this model's tokenizer."
                )
        if context is not None and pair.length > context:
            raise ValueError(
                f"Pair {i} has {len(pair.prompt)} prompt + {len(pair.answer)} answer tokens = {pair.length}, "
                f"longer than the model's context ({context} positions). Shorten the prompt."
            )
        pairs.append(pair)
    return pairs


def _token_ids(item: TokenIds, tokenizer, name: str) -> list[int]:
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError(f"{name} is a string; pass `tokenizer=` to encode strings, or pass token ids.")
        return list(tokenizer(item, add_special_tokens=False).input_ids)
    if isinstance(item, torch.Tensor):
        if item.dim() != 1 or item.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(item.shape)} {item.dtype}.")
        return item.tolist()
    ids = list(item)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{name} must hold integer token ids.")
    return ids


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_cfg_scale(cfg_scale: float) -> None:
    if not cfg_scale >= 0:  # also rejects NaN
        raise ValueError(f"`cfg_scale` must be >= 0 (0 = no guidance), got {cfg_scale!r}.")


# ----------------------------------------------------------------------------------------------------
# Planning: which rows go into which forward pass
# ----------------------------------------------------------------------------------------------------


def _plan_groups(pairs: list[_Pair], mc_num: int, batch_size: int) -> list[_Group]:
    """Each pair's rows, cut into stratified groups of `batch_size` rows (the last takes the remainder).

    Pairs are ordered longest first, so the pairs sharing a forward pass have similar lengths (little
    padding) and the largest batches come first (a memory problem shows at once)."""
    groups = []
    for pair in sorted(pairs, key=lambda p: p.length, reverse=True):
        if len(pair.answer) == 1:  # every row masks the single token: one row is the exact value
            groups.append(_Group(pair, 1))
            continue
        full, remainder = divmod(mc_num, batch_size)
        groups += [_Group(pair, batch_size)] * full + ([_Group(pair, remainder)] if remainder else [])
    return groups


def _pack(groups: list[_Group], batch_size: int) -> list[list[_Group]]:
    """Consecutive groups packed into forward passes of at most `batch_size` rows."""
    chunks, rows = [[]], 0
    for group in groups:
        if rows + group.rows > batch_size:
            chunks.append([])
            rows = 0
        chunks[-1].append(group)
        rows += group.rows
    return chunks


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------------


def _draw_group_masks(
    answer_length: int, rows: int, generator: torch.Generator | None, balanced: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's masks over its answer: (is_masked [rows, L] bool, counts [rows])."""
    k = int(torch.randint(1, answer_length + 1, (), generator=generator))
    counts = official_mask_counts(answer_length, rows, k)  # [rows]
    return random_masks_with_counts(counts, answer_length, generator, balanced), counts


def _chunk_row_losses(
    model, chunk: list[_Group], cfg_scale: float, generator: torch.Generator | None, balanced: bool
) -> list[torch.Tensor]:
    """Noise every group of one forward pass, run the model, and return each group's row losses
    (L / l_j times the summed cross-entropy of row j's masked tokens), one float64 tensor per group."""
    rows = [group.pair for group in chunk for _ in range(group.rows)]
    input_ids, attention_mask, answer_slots = _left_padded(rows, model.config.pad_token_id)  # [R, W], [R, W], [R, A]
    width = answer_slots.shape[1]

    is_masked = torch.zeros_like(answer_slots)  # [R, A], answers right-aligned in the slot
    counts = []
    row = 0
    for group in chunk:
        length = len(group.pair.answer)
        group_masked, group_counts = _draw_group_masks(length, group.rows, generator, balanced)
        is_masked[row : row + group.rows, width - length :] = group_masked
        counts.append(group_counts)
        row += group.rows
    counts = torch.cat(counts)  # [R]

    targets = input_ids[:, -width:].clone()  # [R, A]
    input_ids[:, -width:][is_masked] = model.config.mask_token_id
    prompt_positions = attention_mask.bool()
    prompt_positions[:, -width:] &= ~answer_slots
    device = model.device
    logits = _answer_logits(
        model, input_ids.to(device), attention_mask.to(device), prompt_positions.to(device), width, cfg_scale
    )  # [R, A, V]

    lengths = torch.tensor([len(pair.answer) for pair in rows], dtype=torch.float64)
    row_losses = masked_row_losses(logits, targets, is_masked, lengths / counts)  # [R], float64 on the CPU
    return list(row_losses.split([group.rows for group in chunk]))


def _left_padded(pairs: list[_Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompt+answer rows: (input_ids [R, W], attention_mask [R, W], answer_slots [R, A]),
    A = longest answer; `answer_slots` marks, in the last A columns, where each row's answer is."""
    input_ids, attention_mask = left_pad([pair.prompt + pair.answer for pair in pairs], pad_id)
    _, answer_slots = left_pad([pair.answer for pair in pairs], pad_id)
    return input_ids, attention_mask, answer_slots.bool()


def _answer_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_positions: torch.Tensor,
    answer_width: int,
    cfg_scale: float,
) -> torch.Tensor:
    """Logits of the last `answer_width` positions [R, A, V], with classifier-free guidance when
    `cfg_scale > 0`: u + (w + 1)(c - u), u from a copy whose prompt positions are all masked."""
    if cfg_scale > 0:
        unconditional = input_ids.masked_fill(prompt_positions, model.config.mask_token_id)
        input_ids = torch.cat([input_ids, unconditional])  # [2R, W]
        attention_mask = torch.cat([attention_mask, attention_mask])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=answer_width).logits
    if cfg_scale > 0:
        logits = classifier_free_guidance(*logits.chunk(2), cfg_scale)
    return logits


def _combine_groups(group_losses: list[torch.Tensor]) -> tuple[float, float]:
    """Mean row loss over all groups of a pair, and its standard error.

    Groups are independent clusters of rows, so the error comes from the spread of the group means,
    each weighted by its share of the rows (the usual cluster-sampling estimate)."""
    sizes = torch.tensor([len(g) for g in group_losses], dtype=torch.float64)
    means = torch.stack([g.mean() for g in group_losses])
    shares = sizes / sizes.sum()
    estimate = float((shares * means).sum())
    if len(group_losses) == 1:  # only single-token answers (exact), or a stderr nobody asked for
        return estimate, 0.0 if sizes[0] == 1 else math.nan
    groups = len(group_losses)
    variance = groups / (groups - 1) * float((shares**2 * (means - estimate) ** 2).sum())
    return estimate, math.sqrt(variance)


# ----------------------------------------------------------------------------------------------------
# Greedy decoding of the answer
# ----------------------------------------------------------------------------------------------------


def _greedy_decode_matches(model, pairs: list[_Pair], cfg_scale: float) -> list[bool]:
    """Decode every answer slot of `pairs` one token per step, most confident first; compare."""
    input_ids, attention_mask, answer_slots = _left_padded(pairs, model.config.pad_token_id)
    width = answer_slots.shape[1]
    targets = input_ids[:, -width:].clone()  # [R, A]
    mask_id = model.config.mask_token_id
    input_ids[:, -width:][answer_slots] = mask_id
    prompt_positions = attention_mask.bool()
    prompt_positions[:, -width:] &= ~answer_slots

    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    prompt_positions = prompt_positions.to(device)
    answer_slots = answer_slots.to(device)
    for _ in range(width):
        still_masked = answer_slots & (input_ids[:, -width:] == mask_id)  # [R, A]
        logits = _answer_logits(model, input_ids, attention_mask, prompt_positions, width, cfg_scale)  # [R, A, V]
        confidence, prediction = torch.softmax(logits.float(), dim=-1).max(dim=-1)  # [R, A] each
        confidence = confidence.masked_fill(~still_masked, -math.inf)
        best = confidence.argmax(dim=1)  # [R]
        rows = still_masked.any(dim=1).nonzero()[:, 0]  # rows whose answer is not finished
        input_ids[rows, input_ids.shape[1] - width + best[rows]] = prediction[rows, best[rows]]
    decoded = input_ids[:, -width:].cpu()
    return [bool((decoded[i] == targets[i])[answer_slots[i].cpu()].all()) for i in range(len(pairs))]
