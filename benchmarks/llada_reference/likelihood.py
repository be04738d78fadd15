"""Independent, deliberately plain references for the likelihood estimator (docs/LLADA.md section 4).

- `reference_log_likelihood` / `reference_greedy_decode`: the official evaluation's algorithm, one pair at
  a time, no padding, no attention mask, rows masked with `torch.randperm`.
- `exact_expected_estimate`: the estimator's exact expectation, by enumerating every mask pattern of a
  short answer (the official mask-count schedule enumerated over every k).

The model is any callable `logits_fn(ids [B, T]) -> logits [B, T, V]`, so CFG is tested by passing a
guided one (`guided_logits_fn`).
"""

import itertools
import math

import torch
import torch.nn.functional as F


def model_logits_fn(model):
    """The model as a plain function of unpadded ids."""
    def logits_fn(ids):
        with torch.no_grad():
            return model(ids).logits.double()
    return logits_fn


def guided_logits_fn(model, prompt_length: int, cfg_scale: float):
    """Official unsupervised CFG: u + (w + 1)(c - u), u from a copy with the prompt fully masked."""
    def logits_fn(ids):
        unconditional = ids.clone()
        unconditional[:, :prompt_length] = model.config.mask_token_id
        with torch.no_grad():
            both = model(torch.cat([ids, unconditional])).logits.double()
        conditional, uncond = both.chunk(2)
        return uncond + (cfg_scale + 1) * (conditional - uncond)
    return logits_fn


def reference_mask_counts(answer_length, rows, k):
    """The official stratified schedule, written as the official code computes it (float32, torch.round)."""
    k = torch.tensor(k)
    spread = torch.linspace(float(k), k + (rows - 1) * (answer_length / rows), steps=rows)
    counts = torch.round(spread).long()
    return ((counts - 1) % answer_length) + 1


def reference_log_likelihood(logits_fn, mask_id, prompt, answer, mc_num, batch_size, generator):
    """Official `get_log_likelihood` for one pair; returns (estimate, stderr over batches)."""
    prompt, answer = torch.tensor(prompt), torch.tensor(answer)
    length = len(answer)
    seq = torch.cat([prompt, answer])[None].repeat(batch_size, 1)  # [b, P + L]
    batch_losses = []
    for _ in range(mc_num // batch_size):
        k = int(torch.randint(1, length + 1, (), generator=generator))
        counts = reference_mask_counts(length, batch_size, k)
        is_masked = torch.zeros_like(seq, dtype=torch.bool)
        for row in range(batch_size):
            chosen = torch.randperm(length, generator=generator)[: counts[row]]
            is_masked[row, len(prompt) + chosen] = True
        noisy = torch.where(is_masked, mask_id, seq)
        logits = logits_fn(noisy)
        ratio = (counts.double() / length)[:, None].expand_as(seq)  # the official p_mask
        loss = F.cross_entropy(logits[is_masked], seq[is_masked], reduction="none") / ratio[is_masked]
        batch_losses.append(float(loss.sum()) / batch_size)
    losses = torch.tensor(batch_losses, dtype=torch.float64)
    stderr = float(losses.std() / math.sqrt(len(losses))) if len(losses) > 1 else math.nan
    return -float(losses.mean()), stderr


def reference_greedy_decode(logits_fn, mask_id, prompt, answer_length):
    """Official `suffix_greedy_prediction`'s decoding for one pair: the decoded answer ids."""
    seq = torch.tensor(prompt + [mask_id] * answer_length)[None]
    for _ in range(answer_length):
        is_masked = seq == mask_id
        logits = logits_fn(seq)[is_masked]  # [masked, V]
        prediction = logits.argmax(-1)
        confidence = torch.softmax(logits.float(), -1).gather(-1, prediction[:, None])[:, 0]
        keep = confidence.argmax()
        committed = torch.full_like(prediction, mask_id)
        committed[keep] = prediction[keep]
        seq[is_masked] = committed
    return seq[0, len(prompt):].tolist()


def masked_loss_by_count(logits_fn, mask_id, prompt, answer):
    """For every count l in 1..L: the mean, over all l-subsets S of answer positions, of the summed
    cross-entropy at S when exactly S is masked. Returns {l: value}."""
    seq = torch.tensor(prompt + answer)
    length = len(answer)
    by_count = {}
    for count in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), count))
        noisy = seq.repeat(len(subsets), 1)
        for row, subset in enumerate(subsets):
            noisy[row, [len(prompt) + i for i in subset]] = mask_id
        logits = logits_fn(noisy)
        is_masked = noisy == mask_id
        is_masked[:, : len(prompt)] = False
        losses = F.cross_entropy(logits[is_masked], seq.repeat(len(subsets), 1)[is_masked], reduction="none")
        by_count[count] = float(losses.sum()) / len(subsets)
    return by_count


def exact_expected_estimate(logits_fn, mask_id, prompt, answer, group_sizes):
    """Exact expectation of the estimate when a pair's rows come in groups of `group_sizes` rows."""
    length = len(answer)
    by_count = masked_loss_by_count(logits_fn, mask_id, prompt, answer)
    total = 0.0
    for rows in group_sizes:
        for k in range(1, length + 1):  # k uniform over 1..L
            for count in reference_mask_counts(length, rows, k).tolist():
                total += length / count * by_count[count] / length
    return -total / sum(group_sizes)
