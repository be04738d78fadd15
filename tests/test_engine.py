"""The step engine: requests join a running engine and leave it without changing the other rows' tokens;
prompts given as embeddings decode exactly as prompts given as ids."""

import pytest
import torch
from helpers import MASK_ID, left_padded_batch, tiny_model

from llada_hf.decoding_llada import DiffusionDecodingState, DiffusionEngine


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


REQUESTS = [  # (prompt, settings): different lengths, plans and fast-decoding settings
    ([5, 9, 12, 40], dict(max_new_tokens=12, steps=12, block_length=4)),
    ([7, 8], dict(max_new_tokens=8, steps=4, block_length=8, kv_cache="dual")),
    ([30, 31, 32], dict(max_new_tokens=16, steps=16, block_length=8, kv_cache="dual", confidence_threshold=0.3)),
    ([11, 12, 13, 14, 15], dict(max_new_tokens=8, steps=8, block_length=4, confidence_threshold=0.2,
                                early_exit=True)),
]


def _alone(model, prompt, settings):
    return model.generate(torch.tensor([prompt]), **settings)[0]


def test_requests_joining_at_different_steps_get_what_they_get_alone(model):
    engine = DiffusionEngine(model)
    ids = {}
    for step in range(12):
        if step % 3 == 0 and step // 3 < len(REQUESTS):  # a new request every third step
            prompt, settings = REQUESTS[step // 3]
            [ids[step // 3]] = engine.add(torch.tensor([prompt]), **settings)
        engine.step()
    while engine.has_unfinished:
        engine.step()
    for index, (prompt, settings) in enumerate(REQUESTS):
        assert torch.equal(engine.pop(ids[index]), _alone(model, prompt, settings)), index
    assert engine.states == []  # popped rows are forgotten


def test_a_batch_added_together_shares_forwards_and_equals_generate(model):
    rows = [[5, 9, 12, 40, 41], [7, 8], [30, 31, 32]]
    ids, mask = left_padded_batch(rows)
    settings = dict(max_new_tokens=12, steps=12, block_length=4, kv_cache="dual", confidence_threshold=0.3)
    engine = DiffusionEngine(model)
    row_ids = engine.add(ids, attention_mask=mask, **settings)
    assert len(engine.states) == 1
    while engine.has_unfinished:
        engine.step()
    expected = model.generate(ids, attention_mask=mask, **settings)
    for row_id, row in zip(row_ids, expected):
        assert torch.equal(engine.pop(row_id), row)


@pytest.mark.parametrize("settings", [dict(), dict(kv_cache="dual"), dict(kv_cache="prefix", confidence_threshold=0.3),
                                      dict(cfg_scale=1.0)])
def test_a_row_removed_midway_leaves_the_others_unchanged(model, settings):
    rows = [[5, 9, 12, 40, 41], [7, 8], [30, 31, 32]]
    ids, mask = left_padded_batch(rows)
    settings = dict(max_new_tokens=12, steps=12, block_length=4, **settings)
    expected = model.generate(ids, attention_mask=mask, **settings)
    engine = DiffusionEngine(model)
    row_ids = engine.add(ids, attention_mask=mask, **settings)
    for _ in range(5):
        engine.step()
    engine.remove(row_ids[1])
    while engine.has_unfinished:
        engine.step()
    assert torch.equal(engine.pop(row_ids[0]), expected[0])
    assert torch.equal(engine.pop(row_ids[2]), expected[2])
    with pytest.raises(KeyError):
        engine.pop(row_ids[1])


def test_drafts_and_finished_rows(model):
    engine = DiffusionEngine(model)
    [row] = engine.add(torch.tensor([[5, 6, 7]]), max_new_tokens=8, steps=8)
    assert (engine.draft(row) == MASK_ID).all()
    engine.step()
    assert int((engine.draft(row) == MASK_ID).sum()) == 7
    assert not engine.is_finished(row)
    with pytest.raises(ValueError, match="still being decoded"):
        engine.pop(row)
    while engine.has_unfinished:
        finished = engine.step()
    assert finished == [row]


def test_the_state_steps_as_generate(model):
    prompt = torch.tensor([[5, 6, 7]])
    state = model.prepare_decoding(prompt, max_new_tokens=8, steps=8, block_length=4, return_dict_in_generate=True)
    assert isinstance(state, DiffusionDecodingState) and not state.done
    steps = 0
    while not state.done:
        state.step()
        steps += 1
    assert steps == state.nfe == 8
    assert torch.equal(state.output().sequences, model.generate(prompt, max_new_tokens=8, steps=8, block_length=4))
    with pytest.raises(RuntimeError, match="done"):
        state.step()


@pytest.mark.parametrize("settings", [dict(), dict(block_length=4), dict(cfg_scale=1.5),
                                      dict(block_length=4, kv_cache="dual", confidence_threshold=0.3),
                                      dict(block_length=4, kv_cache="prefix", cfg_scale=1.0)])
def test_a_prompt_as_embeddings_decodes_as_the_same_prompt_as_ids(model, settings):
    ids, mask = left_padded_batch([[5, 9, 12, 40, 41], [7, 8]])
    settings = dict(max_new_tokens=12, steps=12, **settings)
    from_ids = model.generate(ids, attention_mask=mask, **settings)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    assert from_embeds.shape == (2, 12)  # only the answer, as transformers returns for embeddings
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def test_bad_embeddings_get_clear_errors(model):
    ids = torch.tensor([[5, 6, 7]])
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="not both"):
        model.generate(ids, inputs_embeds=embeds, max_new_tokens=4)
    with pytest.raises(ValueError, match="hidden"):
        model.generate(inputs_embeds=embeds[0], max_new_tokens=4)
    with pytest.raises(ValueError, match=str(embeds.shape[2])):
        model.generate(inputs_embeds=embeds[..., :4], max_new_tokens=4)
    with pytest.raises(TypeError, match="dtype"):
        model.generate(inputs_embeds=embeds.double(), max_new_tokens=4)


def test_requests_without_a_cache_share_one_forward_per_step(model):
    requests = [([5, 9, 12, 40, 41, 42], dict(max_new_tokens=8, steps=8, block_length=4)),
                ([7, 8], dict(max_new_tokens=12, steps=6, block_length=6, cfg_scale=1.0)),
                ([30, 31, 32], dict(max_new_tokens=8, steps=8, remasking="margin", confidence_threshold=0.3))]
    engine = DiffusionEngine(model)
    ids = []
    for prompt, settings in requests:
        ids += engine.add(torch.tensor([prompt]), **settings)
        engine.step()
    while engine.has_unfinished:
        engine.step()
    alone_forwards = 0
    for row_id, (prompt, settings) in zip(ids, requests):
        alone = model.generate(torch.tensor([prompt]), return_dict_in_generate=True, **settings)
        alone_forwards += alone.nfe
        assert torch.equal(engine.pop(row_id), alone.sequences[0])
    assert engine.forward_passes < alone_forwards


def test_embedded_and_id_prompts_share_a_forward(model):
    engine = DiffusionEngine(model)
    [by_ids] = engine.add(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, steps=6)
    embeds = model.get_input_embeddings()(torch.tensor([[9, 10]]))
    [by_embeds] = engine.add(inputs_embeds=embeds, max_new_tokens=6, steps=6)
    while engine.has_unfinished:
        engine.step()
    assert engine.forward_passes == 6
    assert torch.equal(engine.pop(by_ids), model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, steps=6)[0])
    alone = model.generate(torch.tensor([[9, 10]]), max_new_tokens=6, steps=6)[0, 2:]
    assert torch.equal(engine.pop(by_embeds), alone)


def test_infill_is_a_decoding_state_like_generate(model):
    """`infill` builds its state through `prepare_decoding(infill=True)`, so an engine serves infill requests too,
    beside generation requests, with the tokens `infill` gives alone."""
    holes = torch.tensor([[5, MASK_ID, 7, MASK_ID, MASK_ID, 9]])
    engine = DiffusionEngine(model)
    [filled] = engine.add(holes, infill=True, steps=2)
    [answered] = engine.add(torch.tensor([[5, 6, 7]]), max_new_tokens=4, steps=4)
    while engine.has_unfinished:
        engine.step()
    assert torch.equal(engine.pop(filled), model.infill(holes, steps=2)[0])
    assert torch.equal(engine.pop(answered), model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, steps=4)[0])
    with pytest.raises(TypeError, match="infill"):  # generate always appends an answer
        model.generate(holes, infill=True)
