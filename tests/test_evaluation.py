"""The Monte-Carlo ELBO and greedy matching, checked against exact enumeration and the official algorithm."""

import math

import pytest
import torch
from helpers import MASK_ID, tiny_model
from llada_reference import (
    exact_expected_estimate,
    guided_logits_fn,
    masked_loss_by_count,
    model_logits_fn,
    reference_greedy_decode,
    reference_log_likelihood,
    reference_mask_counts,
)

from llada_hf.elbo import official_mask_counts
from llada_hf.evaluation import greedy_match, log_likelihood


# Answers of 2 and 3 tokens (every mask pattern can be enumerated) behind prompts of different lengths,
# so one call pads them together.
PAIRS = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13, 14, 15]), ([20, 21, 22, 23, 24, 25], [26, 27, 28])]
PROMPTS = [p for p, _ in PAIRS]
ANSWERS = [a for _, a in PAIRS]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _group_sizes(mc_num, batch_size):
    return [batch_size] * (mc_num // batch_size) + ([mc_num % batch_size] if mc_num % batch_size else [])


def test_mask_count_schedule_is_the_official_one():
    for length in range(1, 25):
        for rows in (1, 2, 3, 4, 5, 7, 8, 16, 32):
            for k in range(1, length + 1):
                ours = official_mask_counts(length, rows, k)
                assert torch.equal(ours, reference_mask_counts(length, rows, k)), (length, rows, k)
                assert ours.min() >= 1 and ours.max() <= length


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_batched_estimate_converges_to_the_exact_expectation(model, cfg_scale):
    # mc_num is not a multiple of batch_size: the last group of every pair has 8 rows.
    mc_num, batch_size = 1000, 16
    estimates, stderrs = log_likelihood(
        model, PROMPTS, ANSWERS, mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale,
        generator=torch.Generator().manual_seed(0), return_stderr=True,
    )
    for (prompt, answer), estimate, stderr in zip(PAIRS, estimates, stderrs):
        logits_fn = guided_logits_fn(model, len(prompt), cfg_scale) if cfg_scale else model_logits_fn(model)
        exact = exact_expected_estimate(logits_fn, MASK_ID, prompt, answer, _group_sizes(mc_num, batch_size))
        assert 0 < stderr < 0.02 * abs(exact)  # the check below is a sharp one
        assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_official_unbatched_reference_converges_to_the_same_expectation(model):
    generator = torch.Generator().manual_seed(1)
    logits_fn = model_logits_fn(model)
    for prompt, answer in PAIRS:
        exact = exact_expected_estimate(logits_fn, MASK_ID, prompt, answer, [16])
        estimate, stderr = reference_log_likelihood(logits_fn, MASK_ID, prompt, answer, 1024, 16, generator)
        assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_guidance_changes_the_expectation(model):
    # Guards the CFG test above against a guided path that silently equals the plain one.
    prompt, answer = PAIRS[0]
    plain = exact_expected_estimate(model_logits_fn(model), MASK_ID, prompt, answer, [16])
    guided = exact_expected_estimate(guided_logits_fn(model, len(prompt), 1.5), MASK_ID, prompt, answer, [16])
    assert abs(plain - guided) > 0.5


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_single_token_answers_are_exact_and_padding_free(model, cfg_scale):
    prompts, answers = [[5, 6, 7, 8, 9, 10], [11], []], [[12], [13], [14]]
    estimates, stderrs = log_likelihood(model, prompts, answers, cfg_scale=cfg_scale, return_stderr=True)
    for prompt, answer, estimate, stderr in zip(prompts, answers, estimates, stderrs):
        logits_fn = guided_logits_fn(model, len(prompt), cfg_scale) if cfg_scale else model_logits_fn(model)
        exact = -masked_loss_by_count(logits_fn, MASK_ID, prompt, answer)[1]
        assert estimate == pytest.approx(exact, abs=1e-4)
        assert stderr == 0.0


def test_estimates_are_unbiased_their_stderr_calibrated_and_balanced_masks_cut_the_spread(model):
    # 100 independent estimates of one pair, from copies of it in a single call, per masking scheme.
    copies, mc_num, batch_size = 100, 96, 16
    prompt, answer = PAIRS[2]
    exact = exact_expected_estimate(model_logits_fn(model), MASK_ID, prompt, answer, [batch_size] * 6)
    spread = {}
    for balanced in (False, True):
        estimates, stderrs = log_likelihood(
            model, [prompt] * copies, [answer] * copies, mc_num=mc_num, batch_size=batch_size,
            generator=torch.Generator().manual_seed(2), return_stderr=True, balanced_masks=balanced,
        )
        estimates, stderrs = torch.tensor(estimates, dtype=torch.float64), torch.tensor(stderrs, dtype=torch.float64)
        spread[balanced] = float(estimates.std())
        assert abs(float(estimates.mean()) - exact) < 4 * spread[balanced] / math.sqrt(copies)
        assert 0.7 < spread[balanced] / float(stderrs.pow(2).mean().sqrt()) < 1.4
    assert spread[True] < 0.5 * spread[False], spread


def test_pairs_share_forward_passes_and_every_row_is_run(model):
    rows = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        log_likelihood(model, PROMPTS, ANSWERS, mc_num=4, batch_size=16)  # three pairs, one pass
        assert rows == [12]
        rows.clear()
        log_likelihood(model, PROMPTS[:1], ANSWERS[:1], mc_num=10, batch_size=4)  # groups of 4, 4, 2
        assert rows == [4, 4, 2]
        rows.clear()
        log_likelihood(model, PROMPTS[:1], ANSWERS[:1], mc_num=10, batch_size=4, cfg_scale=1.0)
        assert rows == [8, 8, 4]
    finally:
        handle.remove()


def test_same_generator_seed_gives_the_same_estimates(model):
    def run():
        return log_likelihood(
            model, PROMPTS, ANSWERS, mc_num=32, batch_size=8, generator=torch.Generator().manual_seed(4)
        )

    assert run() == run()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_greedy_match_follows_the_official_decoding(model, cfg_scale):
    prompts = [[5, 6, 7, 8], [11, 12], [20, 21, 22, 23, 24, 25], [40]]
    decoded = []
    for prompt, length in zip(prompts, (2, 3, 4, 1)):
        logits_fn = guided_logits_fn(model, len(prompt), cfg_scale) if cfg_scale else model_logits_fn(model)
        decoded.append(reference_greedy_decode(logits_fn, MASK_ID, prompt, length))
    assert greedy_match(model, prompts, decoded, batch_size=3, cfg_scale=cfg_scale) == [True] * 4
    changed = [answer[:-1] + [(answer[-1] + 1) % 90 + 4] for answer in decoded]
    assert greedy_match(model, prompts, changed, cfg_scale=cfg_scale) == [False] * 4


def test_strings_are_encoded_with_the_tokenizer(text_tokenizer, text_model):
    tokenizer, model = text_tokenizer, text_model

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    prompts, answers = ["the cat sat", "a dog"], [" on the mat", " ran"]
    by_text = log_likelihood(
        model, prompts, answers, mc_num=8, batch_size=4, tokenizer=tokenizer,
        generator=torch.Generator().manual_seed(5),
    )
    by_ids = log_likelihood(
        model, [torch.tensor(ids(p)) for p in prompts], [ids(a) for a in answers], mc_num=8, batch_size=4,
        generator=torch.Generator().manual_seed(5),
    )
    assert by_text == by_ids
    greedy_by_ids = greedy_match(model, [ids(p) for p in prompts], [ids(a) for a in answers])
    assert greedy_match(model, prompts, answers, tokenizer=tokenizer) == greedy_by_ids


@pytest.mark.parametrize(
    "prompts, answers, kwargs, message",
    [
        ([[5]], [[]], {}, "answers\\[0\\] is empty"),
        ([[5] * 250], [[6] * 10], {}, "longer than the model's context"),
        ([[5]], [[6, MASK_ID]], {}, "contains the mask token"),
        ([[5], [6]], [[7]], {}, "2 prompts but 1 answers"),
        (["text"], [[7]], {}, "pass `tokenizer=`"),
        ([[5]], [[[6, 7]]], {}, "integer token ids"),
        ([[5]], [torch.tensor([[6, 7]])], {}, "1-D integer tensor"),
        ([[5]], [[6, 7]], {"mc_num": 0}, "`mc_num` must be a positive integer"),
        ([[5]], [[6, 7]], {"batch_size": -2}, "`batch_size` must be a positive integer"),
        ([[5]], [[6, 7]], {"mc_num": 2.5}, "`mc_num` must be a positive integer"),
        ([[5]], [[6, 7]], {"cfg_scale": -1.0}, "`cfg_scale` must be >= 0"),
        ([[5]], [[6, 7]], {"mc_num": 16, "batch_size": 16, "return_stderr": True}, "at least two independent groups"),
    ],
)
def test_bad_input_is_a_clear_error(model, prompts, answers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        log_likelihood(model, prompts, answers, **kwargs)


def test_greedy_match_rejects_bad_input(model):
    with pytest.raises(ValueError, match="answers\\[1\\] is empty"):
        greedy_match(model, [[5], [6]], [[7], []])
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        greedy_match(model, [[5]], [[7]], batch_size=0)
