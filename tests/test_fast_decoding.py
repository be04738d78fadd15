"""Fast diffusion decoding: KV caches, parallel decoding and early exit inside the same generate()."""

import pytest
import torch
from helpers import MASK_ID, left_padded_batch, tiny_model

from llada_hf.cache_llada import DiffusionCache


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


ROWS = [[5, 9, 12, 40, 41, 42, 43], [7, 8], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _masked_sequence(answer_length=12):
    ids, mask = left_padded_batch(ROWS)
    x = torch.cat([ids, torch.full((len(ROWS), answer_length), MASK_ID)], 1)
    return x, torch.cat([mask, torch.ones(len(ROWS), answer_length, dtype=torch.long)], 1)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("block_start_offset", [0, 4, 8])
def test_cached_logits_equal_a_full_forward_at_the_block_start(model, mode, block_start_offset):
    x, mask = _masked_sequence()
    length = x.shape[1]
    start = length - 12 + block_start_offset
    end = start + 4
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        cache = DiffusionCache(mode)
        cache.start_refill(torch.arange(3))
        cache.set_query_start(0)
        refill = model(x, attention_mask=mask, cache=cache).logits
        cache.set_query_start(start)
        query_end = end if mode == "dual" else length
        partial = model(x[:, start:query_end], attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(refill, full, atol=0, rtol=0)
    torch.testing.assert_close(partial, full[:, start:query_end], atol=1e-5, rtol=1e-5)


def test_unreachable_threshold_reproduces_the_baseline(model):
    ids, mask = left_padded_batch(ROWS)
    settings = dict(max_new_tokens=16, steps=16, block_length=4, return_dict_in_generate=True)
    base = model.generate(ids, attention_mask=mask, **settings)
    never = model.generate(ids, attention_mask=mask, confidence_threshold=1.0, **settings)
    assert torch.equal(never.sequences, base.sequences)
    assert never.nfe == base.nfe == 16
    assert never.tokens_per_forward.tolist() == [1.0, 1.0, 1.0]


def test_threshold_and_factor_commit_more_per_step(model):
    ids, mask = left_padded_batch(ROWS)
    settings = dict(max_new_tokens=16, steps=16, block_length=8, return_dict_in_generate=True)
    loose = model.generate(ids, attention_mask=mask, confidence_threshold=0.05, **settings)
    assert loose.nfe < 16 and loose.commit_step.ge(0).all()
    factor = model.generate(ids, attention_mask=mask, parallel_factor=3.0, **settings)
    assert factor.nfe < 16 and factor.commit_step.ge(0).all()
    assert bool((factor.tokens_per_forward > 1).all())


FAST_SETTINGS = {
    "prefix": dict(kv_cache="prefix"),
    "dual": dict(kv_cache="dual"),
    "threshold": dict(confidence_threshold=0.3),
    "dual+threshold+early_exit": dict(kv_cache="dual", confidence_threshold=0.3, early_exit=True),
    "prefix+factor+cfg": dict(kv_cache="prefix", parallel_factor=1.0, cfg_scale=1.0),
    "dual+margin": dict(kv_cache="dual", remasking="margin"),
    "prefix+entropy": dict(kv_cache="prefix", remasking="entropy"),
}


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
def test_every_strategy_runs_with_each_cache(model, kv_cache, remasking):
    ids, mask = left_padded_batch(ROWS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, steps=6, block_length=4, kv_cache=kv_cache,
                         remasking=remasking, generator=torch.Generator().manual_seed(0), logits_mask_inf=True,
                         return_dict_in_generate=True)
    assert out.nfe == 6 and out.commit_step.ge(0).all()
    assert not out.sequences[:, -12:].eq(model.config.mask_token_id).any()


@pytest.mark.parametrize("name", sorted(FAST_SETTINGS))
def test_each_row_of_a_batch_gets_what_it_gets_alone(model, name):
    """The property the reference speed-up code loses: padding and batching must not change a row."""
    ids, mask = left_padded_batch(ROWS)
    settings = dict(max_new_tokens=12, steps=12, block_length=4, **FAST_SETTINGS[name])
    batch = model.generate(ids, attention_mask=mask, **settings)
    for i, row in enumerate(ROWS):
        alone = model.generate(torch.tensor([row]), **settings)
        assert torch.equal(batch[i, -12:], alone[0, -12:]), f"row {i}"


def test_early_exit_rows_leave_the_batch(model):
    ids, mask = left_padded_batch([[5, 9, 12, 40], [7, 8, 30]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, steps=16, block_length=4, early_exit=True,
                         kv_cache="dual", return_dict_in_generate=True)
    alone = [
        model.generate(r, max_new_tokens=16, steps=16, block_length=4, early_exit=True, kv_cache="dual",
                       return_dict_in_generate=True)
        for r in (torch.tensor([[5, 9, 12, 40]]), torch.tensor([[7, 8, 30]]))
    ]
    assert out.nfe == max(a.nfe for a in alone)  # a finished row costs no more forward passes
    for i, a in enumerate(alone):
        assert torch.equal(out.sequences[i, -16:], a.sequences[0, -16:])


def test_bad_fast_settings_get_clear_errors(model):
    prompt = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="kv_cache"):
        model.generate(prompt, kv_cache="triple")
    for tau in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="confidence_threshold"):
            model.generate(prompt, confidence_threshold=tau)
    for f in (0.0, -1.0):
        with pytest.raises(ValueError, match="parallel_factor"):
            model.generate(prompt, parallel_factor=f)
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="attn_implementation"):
            model.generate(prompt, kv_cache="dual")
    finally:
        model.config._attn_implementation = "sdpa"


def test_eager_and_sdpa_caches_agree():
    ids, mask = left_padded_batch(ROWS)
    outs = []
    for impl in ("eager", "sdpa"):
        model = tiny_model(seed=3)
        model.config._attn_implementation = impl
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, steps=8, block_length=4,
                                   kv_cache="dual"))
    assert torch.equal(outs[0], outs[1])


def test_entropy_bound_commits_more_per_step_and_a_tiny_bound_is_the_baseline(model):
    ids, mask = left_padded_batch(ROWS)
    settings = dict(max_new_tokens=16, steps=16, block_length=8, return_dict_in_generate=True)
    base = model.generate(ids, attention_mask=mask, **settings)
    tiny = model.generate(ids, attention_mask=mask, entropy_bound=1e-12, **settings)
    assert torch.equal(tiny.sequences, base.sequences) and tiny.nfe == 16
    loose = model.generate(ids, attention_mask=mask, entropy_bound=20.0, **settings)
    assert loose.nfe < 16 and loose.commit_step.ge(0).all()


def test_a_bounded_canvas_runs_only_the_block_and_its_tail(model):
    ids, mask = left_padded_batch(ROWS)
    settings = dict(max_new_tokens=16, steps=16, block_length=4)
    widths = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]),
        with_kwargs=True)
    try:
        whole = model.generate(ids, attention_mask=mask, canvas_tail=100, **settings)
        assert set(widths) == {ids.shape[1] + 16}
        widths.clear()
        bounded = model.generate(ids, attention_mask=mask, canvas_tail=2, kv_cache="dual", logits_mask_inf=True,
                                 **settings)
    finally:
        hook.remove()
    assert torch.equal(whole, model.generate(ids, attention_mask=mask, **settings))
    assert widths[0] == ids.shape[1] + 6  # the prompt, the first block and 2 positions of its tail
    assert widths[:4] == [ids.shape[1] + 6, 4, 4, 4]  # then the dual cache runs the block alone
    assert not (bounded == MASK_ID).any()


def test_the_forward_compiles_with_a_diffusion_cache(model):
    x, mask = _masked_sequence()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        cache = DiffusionCache("dual")
        cache.start_refill(torch.arange(3))
        cache.set_query_start(0)
        compiled(x, attention_mask=mask, cache=cache)
        start = x.shape[1] - 12
        cache.set_query_start(start)
        partial = compiled(x[:, start:start + 4], attention_mask=mask, cache=cache).logits
        full = model(x, attention_mask=mask).logits
    torch.testing.assert_close(partial, full[:, start:start + 4], atol=1e-5, rtol=1e-5)


def test_a_cached_generate_calls_the_forward_with_two_shapes_only(model):
    """The window keeps the block's width, so a compiled forward compiles once per shape, not once per step."""
    ids, mask = left_padded_batch(ROWS)
    shapes = set()

    def record(module, args, kwargs):
        shapes.add((tuple(kwargs["input_ids"].shape), kwargs["logits_to_keep"].numel()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=16, steps=16, block_length=4, kv_cache="dual")
    finally:
        handle.remove()
    assert shapes == {((3, ids.shape[1] + 16), 4), ((3, 4), 4)}


@pytest.mark.parametrize("kv_cache", [None, "dual"])
def test_a_row_whose_block_is_done_sits_out_the_steps_and_is_unchanged(model, kv_cache):
    ids, mask = left_padded_batch(ROWS)
    settings = dict(max_new_tokens=8, steps=8, block_length=4, confidence_threshold=0.2, kv_cache=kv_cache)
    state = model.prepare_decoding(ids, attention_mask=mask, **settings)
    while not state.done:
        state.step()
    forwards = state.forwards_taken.tolist()
    assert min(forwards) < state.nfe  # some row took fewer forward passes than the batch ran
    for row, prompt in enumerate(ROWS):
        alone = model.generate(torch.tensor([prompt]), **settings)
        assert torch.equal(state.output()[row, -8:], alone[0, -8:])


def _query_widths(model, run) -> list[int]:
    """The query widths of the forwards `run()` makes."""
    widths = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]),
        with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return widths


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_refresh_interval_of_one_is_the_cache_as_before_and_longer_ones_skip_full_passes(model, mode):
    ids, mask = left_padded_batch(ROWS)
    # no mask as a candidate: a committed mask would keep a row refreshing until it is decoded again
    settings = dict(max_new_tokens=16, steps=16, block_length=4, kv_cache=mode, logits_mask_inf=True)
    before = model.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(model.generate(ids, attention_mask=mask, cache_refresh_interval=1, **settings), before)
    widths = _query_widths(model, lambda: model.generate(ids, attention_mask=mask, cache_refresh_interval=2,
                                                         **settings))
    full, prompt = ids.shape[1] + 16, ids.shape[1]
    if mode == "dual":  # block 1 and block 3 start by recomputing the block before them, with theirs: 8 positions
        assert widths == [full, 4, 4, 4, 8, 4, 4, 4, full, 4, 4, 4, 8, 4, 4, 4]
    else:  # prefix: from the block (or, at a block that reuses, the block before it) to the end
        assert widths == [full, 16, 16, 16, 16, 12, 12, 12, full, 8, 8, 8, 8, 4, 4, 4]
    assert widths.count(full) == 2 and prompt < full


def test_a_bounded_canvas_that_reuses_the_cache_runs_its_new_tail_and_decodes_every_mask(model):
    ids, mask = left_padded_batch(ROWS)
    settings = dict(max_new_tokens=16, steps=16, block_length=4, kv_cache="dual", logits_mask_inf=True, canvas_tail=2)
    out = []
    widths = _query_widths(model, lambda: out.append(model.generate(ids, attention_mask=mask, cache_refresh_interval=2,
                                                                    **settings)))
    prompt = ids.shape[1]
    # block 1 (and 3) start with the block before, the block and the canvas' new tail (the tail ends with the answer)
    assert widths == [prompt + 6, 4, 4, 4, 10, 4, 4, 4, prompt + 14, 4, 4, 4, 8, 4, 4, 4]
    assert not (out[0] == MASK_ID).any()


def test_a_block_that_reuses_the_cache_sees_the_keys_of_the_last_refresh(model):
    """The first step of a block without a refresh: the block before it and the block run on the current tokens,
    every other position keeps the keys/values of the last full pass (here: the answer all masks)."""
    ids, mask = left_padded_batch(ROWS)
    state = model.prepare_decoding(ids, mask, max_new_tokens=8, steps=8, block_length=4, kv_cache="dual",
                                   cache_refresh_interval=2)
    first_refresh = state.x.clone()
    for _ in range(4):  # block 0
        state.step()
    request = state.plan_forward()
    logits = state.run_forward(request)  # block 1's first step: [rows, its window, V]
    prompt = ids.shape[1]
    with torch.no_grad():
        cache = DiffusionCache("dual")
        cache.start_refill(torch.arange(3))
        cache.set_query_start(0)
        model(first_refresh, attention_mask=torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1), cache=cache)
        cache.set_query_start(prompt)
        expected = model(state.x[:, prompt:], attention_mask=state.attention_mask, cache=cache).logits[:, 4:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, model(state.x, attention_mask=state.attention_mask).logits[:, prompt + 4:])


def test_a_refresh_interval_needs_a_cache(model):
    with pytest.raises(ValueError, match="set `kv_cache`"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=4, cache_refresh_interval=2)
    with pytest.raises(ValueError, match="cache_refresh_interval"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=4, kv_cache="dual", cache_refresh_interval=0)
