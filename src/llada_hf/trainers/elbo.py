"""Batched, differentiable Monte-Carlo ELBO of answers, for preference training (VRPO, LLaDA 1.5).

The estimator is the one of `llada_hf.evaluation.log_likelihood` (docs/LLADA.md section 4): a row masks l of the L
answer tokens, a uniformly random subset of that size, and scores (L / l) x the summed cross-entropy at the masked
positions; minus the mean over rows estimates log p(answer | prompt). The pieces both estimators use live in
`llada_hf.elbo` (`random_masks_with_counts`, `masked_row_losses`). What differs, for training:

- the budget is n = `n_time` x `n_mask` rows per answer: `n_time` mask counts ("timesteps" l/L), each with `n_mask`
  masks. One mask per timestep (`n_mask=1`) is VRPO's optimal allocation;
- the counts of one answer are stratified like the official schedule, but shifted by one uniform draw, so every
  count is exactly uniform on 1..L and the estimate is unbiased for the ELBO (the official schedule's rounding makes
  some counts slightly more likely; see `stratified_mask_counts`);
- the noise is drawn once (`draw_elbo_noise`) and can be scored by several models: the policy and the reference
  score the same timesteps and masks (VRPO's antithetic sampling);
- gradients flow through the policy's estimate.

Rows are laid out as the evaluation does: left-padded, so every answer ends at the last column and only the last A
columns (A = longest answer) go through the LM head.
"""

from dataclasses import dataclass

import torch

from ..elbo import masked_row_losses, official_mask_counts, random_masks_with_counts


@dataclass
class AnswerBatch:
    """Prompt + answer rows, left-padded so that every answer ends at the last column.

    Attributes:
        input_ids: `[R, W]` token ids.
        attention_mask: `[R, W]` 1 on real tokens.
        answer_slots: `[R, A]` bool, where each row's answer lies among the last A columns.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.Tensor
    answer_slots: torch.Tensor

    @property
    def answer_lengths(self) -> torch.Tensor:
        return self.answer_slots.sum(dim=1)


@dataclass
class ElboNoise:
    """The Monte-Carlo draws of an ELBO estimate: `samples` rows per answer (answer-major order).

    Attributes:
        is_masked: `[R * samples, A]` bool, the masked answer slots of each row.
        weights: `[R * samples]` L / l of each row.
        samples: rows per answer (`n_time * n_mask`).
    """

    is_masked: torch.Tensor
    weights: torch.Tensor
    samples: int


def right_align(batch: dict[str, torch.Tensor]) -> AnswerBatch:
    """Turn a right-padded TRL preference batch (`input_ids`, `attention_mask`, `completion_mask`) into an
    `AnswerBatch`: each row is rolled right by its padding, so its completion ends at the last column.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.trainers.elbo import right_align
        >>> batch = right_align({"input_ids": torch.tensor([[5, 6, 7, 0], [5, 8, 9, 7]]),
        ...                      "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        ...                      "completion_mask": torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]])})
        >>> batch.input_ids.tolist(), batch.answer_slots.tolist()
        ([[0, 5, 6, 7], [5, 8, 9, 7]], [[False, False, True], [True, True, True]])
        ```
    """
    attention_mask = batch["attention_mask"]
    width = attention_mask.shape[1]
    padding = width - attention_mask.sum(dim=1)  # [R]
    columns = torch.arange(width, device=attention_mask.device)
    source = (columns[None, :] - padding[:, None]) % width  # [R, W]: column j takes the token at j - padding
    input_ids, attention_mask, completion = (
        batch[key].gather(1, source) for key in ("input_ids", "attention_mask", "completion_mask")
    )
    answer_width = int(completion.sum(dim=1).max())
    return AnswerBatch(input_ids, attention_mask, completion[:, width - answer_width :].bool())


def stratified_mask_counts(answer_length: int, n_time: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n_time` masked-token counts for one answer, spread evenly over 1..L, each exactly uniform on 1..L.

    The spread is the official schedule's (`official_mask_counts` with k = 1), shifted cyclically by one uniform
    draw: a fixed offset plus a uniform k is uniform modulo L, so each row's count is uniform and the estimate
    unbiased, while the rows of one answer still cover the noise levels evenly (stratified timesteps).

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.trainers.elbo import stratified_mask_counts
        >>> sorted(stratified_mask_counts(4, 4, torch.Generator().manual_seed(0)).tolist())
        [1, 2, 3, 4]
        ```
    """
    shift = int(torch.randint(answer_length, (), generator=generator))
    spread = official_mask_counts(answer_length, n_time, 1)  # [n_time] in 1..L
    return (spread - 1 + shift) % answer_length + 1


def draw_elbo_noise(
    answer_lengths: torch.Tensor, n_time: int, n_mask: int, generator: torch.Generator | None = None
) -> ElboNoise:
    """Draw the masks of `n_time * n_mask` Monte-Carlo rows for each answer (on the CPU; `generator` a CPU one).

    Args:
        answer_lengths: `[R]` answer lengths (each >= 1); the masks span the longest one, answers right-aligned.
        n_time: mask counts (timesteps) per answer, stratified (`stratified_mask_counts`).
        n_mask: masks drawn per count; `n_mask=1` is VRPO's optimal allocation of the budget.
        generator: source of the randomness.
    """
    lengths = answer_lengths.tolist()
    width = max(lengths)
    masks, weights = [], []
    for length in lengths:
        counts = stratified_mask_counts(length, n_time, generator).repeat_interleave(n_mask)  # [n]
        is_masked = torch.zeros(len(counts), width, dtype=torch.bool)
        is_masked[:, width - length :] = random_masks_with_counts(counts, length, generator)
        masks.append(is_masked)
        weights.append(length / counts)
    return ElboNoise(torch.cat(masks), torch.cat(weights).float(), n_time * n_mask)


def elbo_estimates(model, batch: AnswerBatch, noise: ElboNoise, mask_token_id: int) -> torch.Tensor:
    """Monte-Carlo ELBO of every answer of `batch` under `model`, from the draws in `noise`: `[R]`, differentiable.

    Each row is repeated `noise.samples` times, its masked slots replaced by the mask token, and one forward pass
    scores them all (the LM head on the answer columns only).
    """
    device = batch.input_ids.device
    samples = noise.samples
    width = batch.answer_slots.shape[1]
    input_ids = batch.input_ids.repeat_interleave(samples, dim=0)  # [R * n, W]
    attention_mask = batch.attention_mask.repeat_interleave(samples, dim=0)
    is_masked = noise.is_masked.to(device)  # [R * n, A]
    targets = input_ids[:, -width:]
    noisy = input_ids.clone()
    noisy[:, -width:] = targets.masked_fill(is_masked, mask_token_id)
    logits = model(input_ids=noisy, attention_mask=attention_mask, logits_to_keep=width, use_cache=False).logits
    row_losses = masked_row_losses(logits, targets, is_masked, noise.weights.to(device))  # [R * n]
    return -row_losses.view(-1, samples).mean(dim=1)
