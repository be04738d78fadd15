"""Continuous batching (issue 30): requests that arrive at any step, with any settings, decode with the running
batch, and every row gets the tokens it gets alone (float32); rows refresh their caches one by one."""

import random

import pytest
import torch
from helpers import MASK_ID, left_padded_batch, tiny_model

from llada_hf.decoding_llada import DiffusionDecodingState, DiffusionEngine


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


SETTINGS = [  # block lengths, steps, thresholds, strategies, CFG, early exit and bounded canvases
    dict(max_new_tokens=12, steps=12, block_length=4),
    dict(max_new_tokens=8, steps=4, block_length=8),
    dict(max_new_tokens=16, steps=16, block_length=8, confidence_threshold=0.3),
    dict(max_new_tokens=12, steps=6, block_length=4, confidence_threshold=0.2, early_exit=True),
    dict(max_new_tokens=8, steps=8, block_length=4, cfg_scale=1.0),
    dict(max_new_tokens=12, steps=12, block_length=4, remasking="margin", canvas_tail=2),
    dict(max_new_tokens=8, steps=8, block_length=4, temperature=0.8),  # sampling: a generator of its own
]
CACHES = [None, "prefix", "dual"]


def _requests(seed: int, kv_cache: str) -> list[tuple[int, list[int], dict]]:
    """(arrival step, prompt, settings) of 12 requests; `kv_cache` "mixed" draws each request's cache."""
    draw = random.Random(seed)
    requests = []
    for _ in range(12):
        settings = dict(draw.choice(SETTINGS))
        settings["kv_cache"] = draw.choice(CACHES) if kv_cache == "mixed" else kv_cache
        prompt = [draw.randrange(4, 90) for _ in range(draw.randint(1, 7))]
        requests.append((draw.randrange(0, 14), prompt, settings))
    return sorted(requests, key=lambda request: request[0])


def _generator(settings: dict, index: int) -> dict:
    """Sampling requests bring their own seeded generator (so that alone and in the engine draw the same numbers)."""
    return {"generator": torch.Generator().manual_seed(index)} if settings.get("temperature") else {}


def _alone(model, prompt, settings, index):
    return model.generate(torch.tensor([prompt]), return_dict_in_generate=True, **settings,
                          **_generator(settings, index))


def _run_engine(model, requests) -> tuple[DiffusionEngine, dict[int, int]]:
    engine, ids, step, pending = DiffusionEngine(model), {}, 0, list(enumerate(requests))
    while pending or engine.has_unfinished:
        while pending and pending[0][1][0] <= step:  # the requests that arrived before this step join it
            index, (_, prompt, settings) = pending.pop(0)
            [ids[index]] = engine.add(torch.tensor([prompt]), **settings, **_generator(settings, index))
        if engine.has_unfinished:
            engine.step()
        step += 1
    return engine, ids


@pytest.mark.parametrize("kv_cache", [None, "prefix", "dual", "mixed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_requests_arriving_at_random_steps_with_mixed_settings_get_what_they_get_alone(model, kv_cache, seed):
    requests = _requests(seed, kv_cache)
    engine, ids = _run_engine(model, requests)
    alone_passes = 0
    for index, (_, prompt, settings) in enumerate(requests):
        alone = _alone(model, prompt, settings, index)
        alone_passes += alone.nfe
        assert torch.equal(engine.pop(ids[index]), alone.sequences[0]), (index, settings)
    assert engine.states == []
    assert engine.forward_passes < 0.7 * alone_passes  # rows of different settings share the passes


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_rows_that_reuse_their_cache_across_blocks_get_what_they_get_alone(model, kv_cache):
    """`cache_refresh_interval` (with and without a bounded canvas, whose reuse steps also run its new tail): rows
    arriving at random steps, each refreshing on its own schedule, equal `generate` alone."""
    draw = random.Random(7)
    choices = [dict(max_new_tokens=16, steps=8, block_length=4, cache_refresh_interval=2),
               dict(max_new_tokens=16, steps=16, block_length=4, cache_refresh_interval=3, canvas_tail=3),
               dict(max_new_tokens=12, steps=12, block_length=4)]
    requests = [(draw.randint(0, 10), [draw.randrange(4, 90) for _ in range(draw.randint(1, 7))],
                 dict(draw.choice(choices), kv_cache=kv_cache)) for _ in range(10)]
    requests.sort(key=lambda request: request[0])
    engine, ids = _run_engine(model, requests)
    for index, (_, prompt, settings) in enumerate(requests):
        assert torch.equal(engine.pop(ids[index]), _alone(model, prompt, settings, index).sequences[0]), settings


def test_requests_with_the_same_settings_join_one_state_and_leave_it(model):
    """Later requests join the running state as cohorts of their own, each at its own block and step; a longer
    prompt widens the state, and the padding goes when that row has left."""
    settings = dict(max_new_tokens=12, steps=12, block_length=4, kv_cache="dual")
    engine, prompts, widths = DiffusionEngine(model), {}, []
    for prompt in ([5, 9], [30, 31, 32, 33, 34, 35], [7], [40, 41, 42]):
        [row_id] = engine.add(torch.tensor([prompt]), **settings)
        prompts[row_id] = prompt
        engine.step()
        assert len(engine.states) == 1
    while prompts:
        for row_id in [row_id for row_id in prompts if engine.is_finished(row_id)]:
            alone = model.generate(torch.tensor([prompts.pop(row_id)]), **settings)[0]
            assert torch.equal(engine.pop(row_id), alone)
        if engine.has_unfinished:
            engine.step()
        widths += [state.x.shape[1] for state in engine.states]
    assert max(widths) == 6 + 12 and min(widths) < 6 + 12


def test_prompts_as_embeddings_join_and_share_passes_with_ids(model):
    settings = dict(max_new_tokens=8, steps=8, block_length=4, kv_cache="dual")
    engine = DiffusionEngine(model)
    [by_ids] = engine.add(torch.tensor([[5, 6, 7, 8]]), **settings)
    engine.step()
    embeds = [model.get_input_embeddings()(torch.tensor([prompt])) for prompt in ([9, 10], [11, 12, 13, 14, 15])]
    first = engine.add(inputs_embeds=embeds[0], **settings)
    engine.step()
    second = engine.add(inputs_embeds=embeds[1], **settings)
    assert len(engine.states) == 2  # one per prompt kind; the embedded prompts share one
    while engine.has_unfinished:
        engine.step()
    assert torch.equal(engine.pop(by_ids), model.generate(torch.tensor([[5, 6, 7, 8]]), **settings)[0])
    for [row_id], prompt in zip((first, second), ([9, 10], [11, 12, 13, 14, 15])):
        alone = model.generate(torch.tensor([prompt]), **settings)[0, len(prompt):]
        assert torch.equal(engine.pop(row_id), alone)


# ---- per-row cache refresh --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_committing_model():
    """A tiny model whose head row for the mask token outscores a word it often predicts, so that rows commit the
    mask token itself (allowed by default, `logits_mask_inf=False`, as in the official sampler) and leave a mask
    before their next block."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        logits = model(torch.randint(4, 90, (8, 16))).logits
        favourite = int(logits.argmax(-1).flatten().mode().values)
        model.lm_head.weight[MASK_ID] = model.lm_head.weight[favourite] * 2
    return model


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_a_row_that_commits_the_mask_token_refreshes_alone(mask_committing_model, kv_cache, monkeypatch):
    """A row with a mask left before its block runs its whole canvas (its cached prefix is changing); its
    batch-mates keep reading their caches, and every row gets what it gets alone."""
    model = mask_committing_model
    settings = dict(max_new_tokens=16, steps=16, block_length=4, kv_cache=kv_cache)
    rows = [[5 + i, 9, 12 + 3 * i, 40][: 1 + i % 4] for i in range(12)]
    leftover = []
    plan = DiffusionDecodingState.plan_forward

    def spy(state):
        request = plan(state)
        leftover.append(bool((request.window_end - request.window_start > 4).any()))  # a window wider than its block
        return request

    monkeypatch.setattr(DiffusionDecodingState, "plan_forward", spy)
    ids, mask = left_padded_batch(rows)
    batch = model.generate(ids, attention_mask=mask, **settings)
    assert any(leftover)  # the case this test is about happened
    for row, prompt in enumerate(rows):
        alone = model.generate(torch.tensor([prompt]), **settings)
        assert torch.equal(batch[row, -16:], alone[0, -16:]), row


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_a_mask_in_one_prompt_does_not_change_its_batch_mates(model, kv_cache):
    """Masks left in a prompt stay eligible (the official sampler): that row runs its whole canvas at every step
    until they are decoded, the other rows read their caches as they do alone."""
    rows = [[53, MASK_ID, MASK_ID, MASK_ID, 58, 66, 53], [79, 10, 53], [33, 85], [27, 50]]
    settings = dict(max_new_tokens=12, steps=12, block_length=4, kv_cache=kv_cache)
    ids, mask = left_padded_batch(rows)
    batch = model.generate(ids, attention_mask=mask, **settings)
    for row, prompt in enumerate(rows):
        alone = model.generate(torch.tensor([prompt]), **settings)
        assert torch.equal(batch[row, -(len(prompt) + 12):], alone[0]), row


def test_rows_of_different_cache_modes_and_block_lengths_share_passes(model):
    """One step: the rows that refresh (or have no cache) share one pass, the rows that read their caches share one
    pass per query width."""
    engine = DiffusionEngine(model)
    for prompt, settings in (([5, 6, 7], dict(kv_cache="dual", block_length=4)),
                             ([8, 9], dict(kv_cache="dual", block_length=4, remasking="margin")),
                             ([10, 11, 12, 13], dict(kv_cache=None, block_length=8)),
                             ([14], dict(kv_cache="prefix", block_length=4))):
        engine.add(torch.tensor([prompt]), max_new_tokens=8, steps=8, **settings)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        engine.step()  # every row's first step: one whole-canvas pass
        assert calls == [(4, 12)]
        calls.clear()
        engine.step()  # dual rows: their block (4 wide); prefix row: 8 wide; the cache-less row: its canvas
        assert sorted(calls) == [(1, 8), (1, 12), (2, 4)]
    finally:
        handle.remove()
