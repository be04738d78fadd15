"""The masked-diffusion training objective of LLaDA (docs/LLADA.md section 5), as small functions.

Noise: per row a time t in [0, 1), a masking probability p = (1 - ε) t + ε, and each answer token replaced by the
mask token with probability p (prompt tokens never). Loss: the cross-entropy at the masked positions, weighted by
1/p, summed per row and normalized. Each function takes its randomness from an explicit `torch.Generator`, so a
test can fix the noise and compute the loss by hand.
"""

import torch


def sample_times(
    num_rows: int,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Diffusion times t in [0, 1), one per row.

    With `antithetic=True` the draws are stratified: row i gets a t from its own interval [k/n, (k+1)/n) (k a random
    permutation of the rows), so every batch covers the whole range of noise levels. Each t is still uniform on
    [0, 1), so the expected loss is unchanged while its variance drops.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.trainers.objective import sample_times
        >>> t = sample_times(4, antithetic=True, generator=torch.Generator().manual_seed(0))
        >>> sorted((t * 4).floor().long().tolist())  # one time in each quarter of [0, 1)
        [0, 1, 2, 3]
        ```
    """
    uniform = torch.rand(num_rows, generator=generator, device=device)
    if not antithetic:
        return uniform
    strata = torch.randperm(num_rows, generator=generator, device=device)
    return (strata + uniform) / num_rows


def masking_probability(t: torch.Tensor, time_epsilon: float) -> torch.Tensor:
    """p = (1 - ε) t + ε: the probability that an answer token is masked at time t (never below ε)."""
    return (1.0 - time_epsilon) * t + time_epsilon


def mask_answer_tokens(
    input_ids: torch.LongTensor,
    answer_mask: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Replace each answer token by `mask_token_id` with its row's probability; other tokens are kept.

    Args:
        input_ids: `[batch, length]` clean token ids.
        answer_mask: `[batch, length]` bool, True where a token may be masked (the answer; every token for
            pretraining).
        mask_prob: `[batch]` masking probability of each row.
        mask_token_id: id of the mask token.
        generator: source of the randomness, on the device of `input_ids`.

    Returns:
        `(noisy_ids, masked)`: the noised ids and the bool `[batch, length]` positions that were masked.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.trainers.objective import mask_answer_tokens
        >>> ids = torch.tensor([[5, 6, 7, 8]])
        >>> answer = torch.tensor([[False, False, True, True]])  # the prompt is never masked
        >>> noisy, masked = mask_answer_tokens(ids, answer, torch.tensor([1.0]), mask_token_id=0)
        >>> noisy.tolist(), masked.tolist()
        ([[5, 6, 0, 0]], [[False, False, True, True]])
        ```
    """
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # [B, L]
    masked = answer_mask & (draws < mask_prob[:, None])
    return input_ids.masked_fill(masked, mask_token_id), masked


def random_length(max_length: int, generator: torch.Generator | None = None) -> int:
    """A length drawn uniformly from [1, max_length] (LLaDA pretraining cuts 1% of its batches to such a length)."""
    return int(torch.randint(1, max_length + 1, (1,), generator=generator))


def masked_diffusion_loss(
    token_nll: torch.Tensor,
    masked: torch.Tensor,
    mask_prob: torch.Tensor,
    answer_lengths: torch.Tensor,
    normalization: str = "answer_length",
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    r"""The masked-diffusion loss: cross-entropy at the masked positions, weighted by 1/p, summed and normalized.

    With S_i = Σ_{masked l} nll_il / p_i the weighted sum of row i (answer length A_i, EOS padding included):

    - `"answer_length"` (LLaDA SFT rule): Σ_i S_i / A_i / N, N = number of rows;
    - `"token"`: Σ_i S_i / N, N = number of answer tokens (Σ_i A_i);
    - `"sequence"`: Σ_i S_i / N, N = number of rows (S_i estimates the negative ELBO of row i's answer, in nats).

    `num_items` replaces N when this batch is one part of a larger one (gradient accumulation, several processes):
    pass the count over the whole optimizer step, so that summing the parts gives the loss of the whole.

    Args:
        token_nll: `[batch, length]` cross-entropy of the original token at each position (any value where not
            masked).
        masked: `[batch, length]` bool, the masked positions.
        mask_prob: `[batch]` masking probability p of each row.
        answer_lengths: `[batch]` number of maskable (answer) tokens of each row.
        normalization: `"answer_length"`, `"token"` or `"sequence"`.
        num_items: rows (`"answer_length"`, `"sequence"`) or answer tokens (`"token"`) of the whole step.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.trainers.objective import masked_diffusion_loss
        >>> nll = torch.tensor([[9.0, 2.0, 4.0]])
        >>> masked = torch.tensor([[False, True, True]])
        >>> masked_diffusion_loss(nll, masked, torch.tensor([0.5]), torch.tensor([2]))  # (2 + 4) / 0.5 / 2
        tensor(6.)
        ```
    """
    row_sums = (token_nll * masked).sum(dim=1) / mask_prob  # [B]  S_i
    if normalization == "answer_length":
        # clamp: a row with no answer token contributes zero instead of 0/0
        per_row = row_sums / answer_lengths.clamp(min=1)
        default_items = len(row_sums)
    elif normalization == "sequence":
        per_row = row_sums
        default_items = len(row_sums)
    elif normalization == "token":
        per_row = row_sums
        default_items = answer_lengths.sum()
    else:
        raise ValueError(f"Unknown loss normalization {normalization!r}; use 'answer_length', 'token' or 'sequence'.")
    items = default_items if num_items is None else num_items
    return per_row.sum() / torch.as_tensor(items, device=per_row.device).clamp(min=1)
