"""`stop_token_ids`: the official LLaDA-V stop rule (its demo and evaluation stop at `<|eot_id|>`), equal to the
independent reference of `generate_with_embeds(..., stopping_criteria=[...])`."""

import json
import os

import pytest
import reference_llada_v as ref
import torch
from llada_v_helpers import (
    BOS_ID,
    CROP,
    END_HEADER_ID,
    EOS_ID,
    EOT_ID,
    MASK_ID,
    START_HEADER_ID,
    TOWER_CONFIG,
    official_config,
    official_pinpoints_wh,
    official_state_dict,
    tiny_processor,
)
from safetensors.torch import save_file
from test_llada_v import _chat_inputs, _image, _official_ids

from transformers import AutoModel


pytestmark = pytest.mark.numerics

SUPPRESSED = [EOS_ID, BOS_ID, START_HEADER_ID, END_HEADER_ID]  # the official sampler's, in the tiny vocabulary
# The end of turn gets the head row of a word the random model often predicts, so that it is committed in the middle
# of answers, sometimes before the positions in front of it: the case where the rule changes those positions.
WORD_THE_EOT_COPIES = 177


@pytest.fixture(scope="module")
def stopping(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stopping")
    os.makedirs(folder / "siglip-tiny")
    (folder / "siglip-tiny" / "config.json").write_text(json.dumps(TOWER_CONFIG))
    state = official_state_dict(seed=0)
    state["lm_head.weight"][EOT_ID] = state["lm_head.weight"][WORD_THE_EOT_COPIES]
    (folder / "config.json").write_text(json.dumps(official_config("siglip-tiny")))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state, AutoModel.from_pretrained(folder).eval(), tiny_processor()


def _reference(state, image, input_ids, stop_sequences, **settings):
    features = ref.image_features(state, TOWER_CONFIG, [image], official_pinpoints_wh(), CROP, 4)
    embeds = ref.merged_embeddings(state, _official_ids(input_ids), features)[None]
    return ref.generate_with_embeds(lambda e: ref.lm_logits(state, official_config(), e),
                                    state["model.embed_tokens.weight"], embeds, MASK_ID, SUPPRESSED,
                                    stop_sequences=stop_sequences, **settings)[0].tolist()


SETTINGS = [
    dict(steps=16, gen_length=16, block_length=16),  # the official demo's shape: one block, a token a step
    dict(steps=4, gen_length=16, block_length=16),  # four tokens a step: the budget moves before the stop
    dict(steps=8, gen_length=16, block_length=8),  # semi-autoregressive
]


def test_stop_token_ids_equal_the_official_stop_rule(stopping):
    state, model, processor = stopping
    changed_by_the_rule = stopped = 0
    for seed in range(4):
        image = _image(70, 40, seed=seed)
        inputs = _chat_inputs(processor, [image], "What is in the image?" if seed % 2 == 0 else "a cat?")
        for settings in SETTINGS:
            official = _reference(state, image, inputs["input_ids"][0], [[EOT_ID]], **settings)
            out = model.generate(**inputs, max_new_tokens=settings["gen_length"], steps=settings["steps"],
                                 block_length=settings["block_length"], suppress_tokens=SUPPRESSED,
                                 stop_token_ids=[EOT_ID])
            answer = out[0, inputs["input_ids"].shape[1]:].tolist()
            # The official answer is cut before the stop; here it is followed by the stop and EOS to the end.
            length = len(official)
            assert answer[:length] == official
            if length < settings["gen_length"]:
                stopped += 1
                assert answer[length:] == [EOT_ID] + [EOS_ID] * (settings["gen_length"] - length - 1)
            plain = _reference(state, image, inputs["input_ids"][0], None, **settings)
            cut = plain[: plain.index(EOT_ID)] if EOT_ID in plain else plain
            changed_by_the_rule += cut != official
    # the check has teeth: the stop fires, and the rule is more than cutting the answer of a run without it
    assert stopped >= 4 and changed_by_the_rule >= 2


def test_rows_of_a_batch_stop_on_their_own(stopping):
    """A row that stops leaves the batch; the others decode as they would alone."""
    _, model, processor = stopping
    images = [_image(70, 40, seed=0), _image(70, 40, seed=1)]
    questions = ["What is in the image?", "a cat?"]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=[[image] for image in images], text=prompts, padding=True, return_tensors="pt")
    settings = dict(max_new_tokens=16, steps=16, block_length=16, suppress_tokens=SUPPRESSED, stop_token_ids=EOT_ID)
    answers = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
    for row, (image, question) in enumerate(zip(images, questions)):
        alone = _chat_inputs(processor, [image], question)
        assert torch.equal(answers[row], model.generate(**alone, **settings)[0, alone["input_ids"].shape[1]:])
    assert bool((answers == EOT_ID).any())


def test_models_with_llada_s_vocabulary_stop_at_the_end_of_turn_by_default(stopping):
    """As the official demo and evaluation (`stopping_criteria=['<|eot_id|>']`); `stop_token_ids=[]` turns it off; a
    model with its own vocabulary has no default stop."""
    from llada_hf import LladaConfig, LladaVConfig, LladaVForConditionalGeneration

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    text = LladaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)  # LLaDA's ids
    model = LladaVForConditionalGeneration(LladaVConfig(text_config=text, vision_config=vision, image_token_id=126400,
                                                        image_grid_pinpoints=[[28, 28]]))
    assert model.generation_config.stop_token_ids == [126348]
    assert model.generation_config.suppress_tokens == [126081, 126080, 126346, 126347]
    # the end of turn outscores the word the random model answers with, so it is committed first
    ids = torch.tensor([[126080, 5, 6, 7]])
    settings = dict(max_new_tokens=8, steps=8, block_length=8)
    word = int(model.generate(ids, **settings)[0, 4:].mode().values)
    with torch.no_grad():
        model.lm_head.weight[126348] = 1.01 * model.lm_head.weight[word]
    stopped = model.generate(ids, **settings)[0, 4:].tolist()
    assert 126348 in stopped and stopped[stopped.index(126348) + 1:] == [126081] * (7 - stopped.index(126348))
    assert model.generate(ids, stop_token_ids=[], **settings)[0, 4:].tolist().count(126348) > 1  # no stop: all filled
    _, own_vocabulary, _ = stopping
    assert own_vocabulary.generation_config.stop_token_ids is None
