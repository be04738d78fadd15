"""The Monte-Carlo ELBO of an answer (docs/LLADA.md section 4): the pieces its two estimators share.

A row masks l of the L answer tokens, a uniformly random subset of that size, and scores (L / l) x the summed
cross-entropy at its masked positions; minus the mean over rows estimates log p(answer | prompt). The evaluation
(`llada_hf.evaluation.log_likelihood`: the official schedule, summed in float64 on the CPU) and the preference
trainer (`llada_hf.trainers.elbo`: batched and differentiable) differ in how they choose the counts l and lay out
the rows; both draw the masks and score the rows with the functions here.
"""

import torch
import torch.nn.functional as F


def official_mask_counts(answer_length: int, rows: int, k: int) -> torch.Tensor:
    """Masked-token counts of an `rows`-row group: spread evenly over 1..L starting at k (official schedule).

    Computed with the official float32 operations, whose roundings at exact halves decide some counts.

    Example:
        ```python
        >>> from llada_hf.elbo import official_mask_counts
        >>> official_mask_counts(answer_length=4, rows=4, k=3).tolist()
        [3, 4, 1, 2]
        ```
    """
    end = torch.tensor(k) + (rows - 1) * (answer_length / rows)  # an int tensor plus a float: float32
    spread = torch.round(torch.linspace(float(k), end, steps=rows)).long()  # [rows]
    return (spread - 1) % answer_length + 1


def random_masks_with_counts(
    counts: torch.Tensor, answer_length: int, generator: torch.Generator | None = None, balanced: bool = False
) -> torch.Tensor:
    """Masks over an answer of `answer_length` tokens, [rows, L] bool: row j masks `counts[j]` positions, a
    uniformly random subset of that size (also with `balanced=True`, where the rows share one random order and
    mask consecutive cyclic windows of it, so every position is masked about equally often).

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.elbo import random_masks_with_counts
        >>> masks = random_masks_with_counts(torch.tensor([1, 3]), 4, torch.Generator().manual_seed(0))
        >>> masks.sum(dim=1).tolist()
        [1, 3]
        ```
    """
    if balanced:
        # One shared random order; row j masks the cyclic window that starts where row j-1's ended.
        order = torch.rand(1, answer_length, generator=generator).argsort(dim=1).argsort(dim=1)  # [1, L] ranks
        starts = (torch.cumsum(counts, 0) - counts) % answer_length  # [rows]
        return (order - starts[:, None]) % answer_length < counts[:, None]  # [rows, L]
    ranks = torch.rand(len(counts), answer_length, generator=generator).argsort(dim=1).argsort(dim=1)  # [rows, L]
    return ranks < counts[:, None]


def masked_row_losses(
    logits: torch.Tensor, targets: torch.Tensor, is_masked: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """`weights[r]` times the summed cross-entropy of row r's masked slots: the ELBO row losses when
    `weights` = L / l (answer length over masked count). [R], in the dtype and on the device of `weights`.

    The cross-entropy is computed in float32 on the logits' device and is differentiable: the evaluation sums it
    in float64 on the CPU, the preference trainer (`DiffusionDPOTrainer`) keeps it on the device with gradients.

    Args:
        logits: `[R, A, V]` logits of the answer slots.
        targets: `[R, A]` the original tokens.
        is_masked: `[R, A]` bool, the masked slots that are scored.
        weights: `[R]` weight of each row.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.elbo import masked_row_losses
        >>> logits = torch.zeros(1, 2, 4)  # uniform predictions: each masked token costs log 4
        >>> scored = torch.tensor([[True, False]])
        >>> losses = masked_row_losses(logits, torch.tensor([[1, 2]]), scored, weights=torch.tensor([2.0]))
        >>> round(losses.item(), 4)  # 2 * log 4
        2.7726
        ```
    """
    selected = is_masked.to(logits.device)
    token_losses = F.cross_entropy(logits[selected].float(), targets.to(logits.device)[selected], reduction="none")
    masked_rows = is_masked.nonzero()[:, 0].to(weights.device)  # row of every masked token
    summed = torch.zeros_like(weights).index_add(0, masked_rows, token_losses.to(weights))  # [R]
    return weights * summed
