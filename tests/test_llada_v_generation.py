"""LLaDA-V generation: the text model's sampler from merged prompt embeddings, equal to the official sampler."""

import pytest
import reference_llada_v as ref
import torch
from llada_v_helpers import (
    BOS_ID,
    CROP,
    END_HEADER_ID,
    EOS_ID,
    IMAGE_ID,
    MASK_ID,
    START_HEADER_ID,
    TOWER_CONFIG,
    official_config,
    official_pinpoints_wh,
    tiny_processor,
    write_official_checkpoint,
)
from test_llada_v import _chat_inputs, _image, _official_ids

from transformers import AutoModel


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


OFFICIAL_SUPPRESSIONS = [EOS_ID, BOS_ID, START_HEADER_ID, END_HEADER_ID]  # the official ids, in the tiny vocabulary


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    _, state = write_official_checkpoint(folder)
    return state, AutoModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _official_answer(state, images, input_ids, **settings):
    feats = ref.image_features(state, TOWER_CONFIG, images, official_pinpoints_wh(), CROP, 4) if images else []
    embeds = ref.merged_embeddings(state, _official_ids(input_ids), feats)[None]
    lm_cfg = official_config()
    return ref.generate_with_embeds(lambda e: ref.lm_logits(state, lm_cfg, e), state["model.embed_tokens.weight"],
                                    embeds, MASK_ID, OFFICIAL_SUPPRESSIONS, **settings)


def test_default_generation_settings(official):
    _, model = official
    assert model.generation_config.mask_token_id == MASK_ID and model.generation_config.eos_token_id == EOS_ID
    assert model.generation_config.suppress_tokens == [EOS_ID, BOS_ID]  # not LLaDA's vocabulary: its own eos, bos


@pytest.mark.parametrize(
    "settings",
    [
        dict(steps=16, gen_length=16, block_length=16),  # the official demo's shape: one block, one token a step
        dict(steps=8, gen_length=16, block_length=4),  # semi-autoregressive, two tokens a step
        dict(steps=8, gen_length=8, block_length=8, cfg_scale=1.5),
    ],
)
def test_generate_equals_the_official_sampler(official, processor, settings):
    state, model = official
    image = _image(70, 40)
    inputs = _chat_inputs(processor, [image], "What is in the image?")
    out = model.generate(**inputs, max_new_tokens=settings["gen_length"], steps=settings["steps"],
                         block_length=settings["block_length"], cfg_scale=settings.get("cfg_scale", 0.0),
                         suppress_tokens=OFFICIAL_SUPPRESSIONS)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])
    expected = _official_answer(state, [image], inputs["input_ids"][0], **settings)
    assert torch.equal(out[:, prompt_length:], expected)
    assert not set(out[0, prompt_length:].tolist()) & set(OFFICIAL_SUPPRESSIONS)


def test_text_only_prompts_generate_as_the_official_sampler(official, processor):
    state, model = official
    inputs = processor(text=["a picture of a cat"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, steps=8, block_length=8, suppress_tokens=OFFICIAL_SUPPRESSIONS)
    expected = _official_answer(state, [], inputs["input_ids"][0], steps=8, gen_length=8, block_length=8)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], expected)


def test_batch_rows_equal_rows_alone(official, processor):
    _, model = official
    images = [_image(84, 50, seed=1), _image(20, 16, seed=2)]
    questions = ["What is in the image?", "a cat?"]
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True)
        for q in questions
    ]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=[[images[0]], [images[1]]], text=prompts, padding=True, return_tensors="pt")
    settings = dict(max_new_tokens=8, steps=8, block_length=4)
    answers = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
    for row, (image, question) in enumerate(zip(images, questions)):
        alone = _chat_inputs(processor, [image], question)
        assert torch.equal(answers[row], model.generate(**alone, **settings)[0, alone["input_ids"].shape[1]:])


def test_the_vision_tower_runs_once_per_request_and_the_options_plug_in(official, processor):
    _, model = official
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        inputs = _chat_inputs(processor, [_image(60, 45), _image(20, 70)], "Which is larger?")  # two images
        out = model.generate(**inputs, max_new_tokens=8, steps=8, block_length=4, kv_cache="dual",
                             confidence_threshold=0.9, return_dict_in_generate=True, output_history=True)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 8)
    assert all(step.shape == out.sequences.shape for step in out.history)
    assert not bool((out.sequences == MASK_ID).any())


def test_image_text_to_text_pipeline(official, processor):
    from transformers import pipeline

    _, model = official
    image = _image(70, 40)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the image?"}]}]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    settings = dict(max_new_tokens=8, steps=8, block_length=4)
    [result] = pipe(text=messages, generate_kwargs=settings)
    inputs = _chat_inputs(processor, [image], "What is in the image?")
    answer = model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1]:]
    assert result["generated_text"][-1] == {"role": "assistant", "content": processor.decode(answer,
                                                                                            skip_special_tokens=True)}


def test_an_official_folder_loads_with_auto_processor_and_generates(tmp_path, processor):
    """A folder laid out as the official one (config, generation_config.json without a mask id, tower folder,
    tokenizer; no processor config): AutoProcessor builds the official processor from the config, and generate runs
    with the mask id of the model config, as the official sampler."""
    import json

    from transformers import AutoProcessor

    _, state = write_official_checkpoint(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.image_token_id, loaded.num_image_tokens) == (processor.image_token_id, processor.num_image_tokens)
    assert loaded.image_processor.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    model = AutoModel.from_pretrained(tmp_path).eval()
    assert model.generation_config.mask_token_id == MASK_ID  # from the model config: the file names none
    image = _image(70, 40)
    inputs = _chat_inputs(loaded, [image], "What is in the image?")
    settings = dict(steps=8, gen_length=8, block_length=8)
    out = model.generate(**inputs, max_new_tokens=8, steps=8, block_length=8, suppress_tokens=OFFICIAL_SUPPRESSIONS)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:],
                       _official_answer(state, [image], inputs["input_ids"][0], **settings))


def test_a_tokenizer_whose_image_id_differs_from_the_config_is_refused_at_load(tmp_path, processor):
    import json

    from transformers import AutoProcessor

    write_official_checkpoint(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["image_token_id"] = IMAGE_ID + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"gives `<image>` the id {IMAGE_ID}, but the model config expects"):
        AutoProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("kv_cache", [None, "prefix", "dual"])
def test_the_engine_decodes_llada_v_rows_joining_at_any_step_as_generate_alone(official, processor, kv_cache):
    """Continuous batching with images (what the server runs): a request that joins a running one after two steps,
    with another picture and question, gets the tokens `generate` gives it alone; so does the running one."""
    from llada_hf.decoding_llada import DiffusionEngine

    _, model = official
    settings = dict(max_new_tokens=8, steps=8, block_length=4, kv_cache=kv_cache)
    first = _chat_inputs(processor, [_image(70, 40, 0)], "What is in the image?")
    second = _chat_inputs(processor, [_image(30, 50, 1), _image(44, 44, 2)], "Which one?")
    alone = [model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1]:] for inputs in (first, second)]
    engine = DiffusionEngine(model)
    [row] = engine.add(**first, **settings)
    for _ in range(2):
        engine.step()
    [joined] = engine.add(**second, **settings)
    assert len(engine.states) == 1  # the same settings: one state, two cohorts
    while engine.has_unfinished:
        engine.step()
    assert torch.equal(engine.pop(row), alone[0]) and torch.equal(engine.pop(joined), alone[1])
