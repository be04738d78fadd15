"""Generation behaves like transformers and fails loudly: low-precision exactness, inherited GenerationConfig
fields, numbers that are not numbers, lengths, leftover masks, padded batches without a mask, inputs."""

import math
import warnings

import pytest
import torch
from helpers import EMBEDDING_ROWS, EOS_ID, EOT_ID, MASK_ID, PAD_ID, left_padded_batch, tiny_model
from llada_reference import reference_generate

from transformers import GenerationConfig

from llada_hf.generation_llada import (
    ACCEPTED_FIELDS,
    DIFFUSION_OPTIONS,
    HONOURED_FIELDS,
    PASSIVE_FIELDS,
    REFUSED_FIELDS,
    DiffusionGenerationConfig,
)


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _prompts(seed=0, batch=1, length=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 90, (batch, length), generator=g)


# ---- 1. bf16 / fp16: the official sampler's own arithmetic ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_generate_equals_the_official_sampler(dtype):
    """Scores are the softmax in the logits' dtype and ties go as `torch.topk` breaks them over the row."""
    model = tiny_model(seed=7).to(dtype)
    model_fn = lambda ids, mask: model(ids, attention_mask=mask).logits  # noqa: E731
    for seed in range(12):
        rows = [_prompts(seed=seed, length=4 + seed % 5)[0].tolist(), _prompts(seed=seed + 50, length=3)[0].tolist()]
        ids, mask = left_padded_batch(rows)
        for block_length in (4, 8):
            settings = dict(steps=16, block_length=block_length)
            ours = model.generate(ids, attention_mask=mask, max_new_tokens=16, **settings)
            ref = reference_generate(model_fn, ids, attention_mask=mask, gen_length=16, mask_id=MASK_ID, **settings)
            assert torch.equal(ours, ref), (seed, block_length)


@pytest.mark.parametrize("logits_eos_inf", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_confidence_eos_eot_inf_equals_the_official_rule(dtype, logits_eos_inf):
    """The official rule at T = 0: EOS and EoT logits are -inf in the confidence softmax (the others renormalised),
    so EOS/EoT candidates score 0. 80 left-padded rows per setting, with EOS and EoT often the likeliest token."""
    model = tiny_model(seed=11)
    with torch.no_grad():  # make EOS and EoT strong candidates, so the rule decides many commits
        model.lm_head.weight[[EOS_ID, EOT_ID]] *= 4
    model = model.to(dtype)
    model_fn = lambda ids, mask: model(ids, attention_mask=mask).logits  # noqa: E731
    settings = dict(steps=12, block_length=6, confidence_eos_eot_inf=True, logits_eos_inf=logits_eos_inf)
    ends_committed = 0
    for seed in range(10):
        rows = [_prompts(seed=100 * seed + i, length=2 + (seed + i) % 6)[0].tolist() for i in range(8)]
        ids, mask = left_padded_batch(rows)
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=12, eot_token_id=EOT_ID, **settings)
        ref = reference_generate(model_fn, ids, attention_mask=mask, gen_length=12, mask_id=MASK_ID, eos_id=EOS_ID,
                                 eot_id=EOT_ID, **settings)
        assert torch.equal(ours, ref), seed
        ends_committed += int(torch.isin(ours[:, -12:], torch.tensor([EOS_ID, EOT_ID])).sum())
    assert ends_committed > 0  # the rule was exercised


def test_official_folders_get_their_token_ids_from_the_model_config(tmp_path):
    """An official folder's generation_config.json names no mask id (nor EoT): the model config fills them, and
    LLaDA's vocabulary (mask 126336) ends a turn with 126348."""
    from helpers import write_official_checkpoint

    from llada_hf import LladaConfig, LladaForMaskedDiffusion

    write_official_checkpoint(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 2, "eos_token_id": 1}')
    model = LladaForMaskedDiffusion.from_pretrained(tmp_path)
    assert (model.generation_config.mask_token_id, model.generation_config.eos_token_id) == (MASK_ID, EOS_ID)
    official = DiffusionGenerationConfig.from_model_config(LladaConfig())  # the official ids by default
    assert (official.mask_token_id, official.eot_token_id) == (126336, 126348)


# Two float16 logits one ulp apart whose softmax probabilities (one such logit, 103 zeros) round to the same float16
# value, each exact probability 0.42 of a float16 spacing inside the rounding interval (far beyond any float32
# rounding inside a softmax kernel), while float64 orders them.
NEAR_TIE_LOW, NEAR_TIE_HIGH = 0.06488037109375, 0.06500244140625


def _near_tie_logits(ids: torch.Tensor, prompt_length: int, leaders: tuple[int, int]) -> torch.Tensor:
    """Crafted float16 logits: answer position i (0..3) predicts one token with the logit HIGH if i is one of the
    `leaders`, else LOW, so in float16 all four confidences tie and in float64 the leaders lead; the token depends
    on what is already committed, so committing other positions first changes the answer."""
    logits = torch.zeros(*ids.shape, EMBEDDING_ROWS, dtype=torch.float16)
    committed = int(ids[0, prompt_length:][ids[0, prompt_length:] != MASK_ID].sum())
    for i in range(ids.shape[1] - prompt_length):
        value = NEAR_TIE_HIGH if i in leaders else NEAR_TIE_LOW
        logits[0, prompt_length + i, 10 + (i + committed) % 40] = value
    return logits


def test_low_precision_ties_follow_the_official_rule_not_float64_scores():
    """The check above has teeth by construction: on crafted near-ties, float64 scores commit other positions first
    and give another answer; `generate` follows the official float16 arithmetic."""
    import torch.nn.functional as F

    from transformers.modeling_outputs import MaskedLMOutput

    row = torch.zeros(EMBEDDING_ROWS, dtype=torch.float16)
    low, high = row.clone(), row.clone()
    low[10], high[10] = NEAR_TIE_LOW, NEAR_TIE_HIGH
    assert F.softmax(low, -1)[10] == F.softmax(high, -1)[10]  # the premise: a float16 tie ...
    assert F.softmax(low.double(), -1)[10] < F.softmax(high.double(), -1)[10]  # ... that float64 breaks

    prompt, settings = torch.tensor([[5, 6, 7]]), dict(steps=2, block_length=4)
    model = tiny_model(seed=7).to(torch.float16)
    same_as_float64 = []
    for leaders in ((1, 2), (0, 3)):
        def crafted_forward(input_ids=None, logits_to_keep=None, **kwargs):
            logits = _near_tie_logits(input_ids, prompt.shape[1], leaders)
            return MaskedLMOutput(logits=logits if logits_to_keep is None else logits[:, logits_to_keep])

        model.forward = crafted_forward
        ours = model.generate(prompt, max_new_tokens=4, **settings)
        ref = reference_generate(lambda ids, mask: _near_tie_logits(ids, 3, leaders), prompt, gen_length=4,
                                 mask_id=MASK_ID, **settings)
        assert torch.equal(ours, ref), leaders
        same_as_float64.append(torch.equal(model.generate(prompt, max_new_tokens=4, score_dtype="float64",
                                                          **settings), ref))
    # float16 sees the same four-way tie in both cases and torch.topk picks the same two positions both times;
    # float64 picks (1, 2), then (0, 3): it must disagree with float16 at least once
    assert not all(same_as_float64)


# ---- 2. every inherited GenerationConfig field is honoured or refused ----------------------------


INHERITED_FIELDS = set(GenerationConfig().to_dict())


def test_the_config_is_a_whitelist_of_the_fields_it_honours():
    """Only the diffusion options, the honoured fields and token ids/bookkeeping may be set; a field that no table
    lists (as one a later transformers release adds) is refused too, never silently ignored."""
    assert not {option.name for option in DIFFUSION_OPTIONS} & INHERITED_FIELDS
    assert set(HONOURED_FIELDS) | set(PASSIVE_FIELDS) <= INHERITED_FIELDS  # the tables name transformers' fields
    with pytest.raises(ValueError, match=r"`top_z=0.5` has no meaning for masked diffusion: generate\(\) does not "):
        DiffusionGenerationConfig(top_z=0.5)
    assert DiffusionGenerationConfig(top_z=None).top_z is None  # unset: nothing to refuse


def test_a_saved_config_round_trips_and_an_unknown_saved_field_is_refused(tmp_path):
    import json

    config = DiffusionGenerationConfig(max_new_tokens=8, steps=4, kv_cache="dual", mask_token_id=MASK_ID)
    config.save_pretrained(tmp_path)
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert (loaded.max_new_tokens, loaded.steps, loaded.kv_cache, loaded.mask_token_id) == (8, 4, "dual", MASK_ID)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(saved, top_z=0.5)))
    with pytest.raises(ValueError, match=r"`top_z=0.5` has no meaning for masked diffusion"):
        DiffusionGenerationConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", sorted(set(REFUSED_FIELDS) | INHERITED_FIELDS - ACCEPTED_FIELDS))
def test_refused_fields_name_the_diffusion_setting(model, name):
    value = {"num_beams": 4, "num_beam_groups": 2, "repetition_penalty": 1.3, "length_penalty": 0.5,
             "diversity_penalty": 0.5, "early_stopping": True, "guidance_scale": 3.0, "no_repeat_ngram_size": 3,
             "encoder_no_repeat_ngram_size": 2, "encoder_repetition_penalty": 1.2, "bad_words_ids": [[5]],
             "max_time": 1.0, "stop_strings": ["x"], "output_scores": True, "output_logits": True,
             "penalty_alpha": 0.6, "top_h": 0.5, "low_memory": True, "renormalize_logits": True,
             "remove_invalid_values": True, "sequence_bias": {(5,): 1.0}}.get(name, 3)
    with pytest.raises(ValueError, match=f"`{name}=.*no meaning for masked diffusion: .+"):
        model.generate(_prompts(), max_new_tokens=4, **{name: value})


def test_neutral_values_of_refused_fields_are_accepted(model):
    """Values that mean "off" (old generation_config.json files carry them) change nothing."""
    neutral = dict(num_beams=1, repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0,
                   output_scores=False, early_stopping=False, bad_words_ids=None, use_cache=True)
    assert torch.equal(model.generate(_prompts(), max_new_tokens=6, **neutral),
                       model.generate(_prompts(), max_new_tokens=6))


def test_max_length_counts_the_prompt(model):
    prompt = _prompts(length=6)
    assert torch.equal(model.generate(prompt, max_length=14), model.generate(prompt, max_new_tokens=8))
    with pytest.warns(UserWarning, match="max_new_tokens"):
        out = model.generate(prompt, max_length=14, max_new_tokens=4)
    assert out.shape[1] == 10
    with pytest.raises(ValueError, match="max_length"):
        model.generate(prompt, max_length=6)


def test_do_sample_false_is_greedy_whatever_the_temperature(model):
    prompt = _prompts()
    greedy = model.generate(prompt, max_new_tokens=8)
    with pytest.warns(UserWarning, match="do_sample=False"):
        tiny_temperature = model.generate(prompt, max_new_tokens=8, do_sample=False, temperature=1e-7)
    assert torch.equal(tiny_temperature, greedy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), greedy)


def test_do_sample_true_samples_at_temperature_one(model):
    prompt = _prompts()
    sampled = model.generate(prompt, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(1))
    at_one = model.generate(prompt, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, at_one)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.0)


def test_min_new_tokens_keeps_eos_out_of_the_first_positions(model):
    prompt = _prompts()
    suppress_all_but_eos = list(range(4, 104))  # every candidate is an end token, unless forbidden
    answer = model.generate(prompt, max_new_tokens=6, suppress_tokens=suppress_all_but_eos, min_new_tokens=3,
                            eot_token_id=EOT_ID)[0, 6:]
    assert not set(answer[:3].tolist()) & {EOS_ID, EOT_ID}
    assert torch.equal(model.generate(prompt, max_new_tokens=6, min_length=9, suppress_tokens=suppress_all_but_eos,
                                      eot_token_id=EOT_ID), model.generate(prompt, max_new_tokens=6, min_new_tokens=3,
                                      suppress_tokens=suppress_all_but_eos, eot_token_id=EOT_ID))


def test_suppress_tokens_and_begin_suppress_tokens(model):
    prompt = _prompts()
    free = model.generate(prompt, max_new_tokens=8)[0, 6:]
    banned = sorted(set(free.tolist()))[:2]
    out = model.generate(prompt, max_new_tokens=8, suppress_tokens=banned)[0, 6:]
    assert not set(out.tolist()) & set(banned)
    first = int(free[0])
    begin = model.generate(prompt, max_new_tokens=8, begin_suppress_tokens=[first])[0, 6:]
    assert int(begin[0]) != first


def test_sampling_filters_min_p_and_typical_run(model):
    prompt = _prompts()
    for kwargs in (dict(min_p=0.2), dict(typical_p=0.5), dict(epsilon_cutoff=1e-3), dict(eta_cutoff=1e-3)):
        out = model.generate(prompt, max_new_tokens=6, temperature=1.0, **kwargs)
        assert out.shape == (1, 12) and not (out == MASK_ID).any()


def test_num_return_sequences_repeats_rows(model):
    ids, mask = left_padded_batch([[5, 6, 7], [8, 9]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_return_sequences=3)
    assert out.shape == (6, 7)
    assert torch.equal(out[0], out[2]) and torch.equal(out[3], out[5])  # greedy: copies agree


def test_use_cache_false_turns_the_diffusion_cache_off(model):
    prompt = _prompts()
    base = model.generate(prompt, max_new_tokens=8, block_length=4)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, block_length=4, kv_cache="dual", use_cache=False),
                       base)


# ---- 6. numbers that are not numbers ------------------------------------------------------------


@pytest.mark.parametrize("name", ["temperature", "cfg_scale", "top_p", "confidence_threshold", "parallel_factor",
                                  "min_p", "typical_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(model, name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        model.generate(_prompts(), max_new_tokens=4, **{name: value})


# ---- 7. lengths -----------------------------------------------------------------------------------


def test_too_long_is_refused_before_anything_is_allocated(model):
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="max_position_embeddings.*allow_beyond_context"):
        model.generate(_prompts(), max_new_tokens=10**7)
    assert time.perf_counter() - start < 0.5
    context = model.config.max_position_embeddings
    with pytest.warns(UserWarning, match="allow_beyond_context"):
        out = model.generate(_prompts(), max_new_tokens=context, steps=4, block_length=context,
                             allow_beyond_context=True)
    assert out.shape[1] == 6 + context


# ---- 8. no mask survives --------------------------------------------------------------------------


def test_masks_in_the_prompt_are_decoded_with_the_first_block(model):
    """The official sampler schedules only the block's masks, so masks in the prompt can be left over; the
    first block's schedule counts them too. Without prompt masks nothing changes (the exactness tests)."""
    prompt = torch.tensor([[MASK_ID, MASK_ID, 5, 6]])
    official = reference_generate(lambda ids, mask: model(ids).logits, prompt, gen_length=4, block_length=4,
                                  steps=4, mask_id=MASK_ID)
    ours = model.generate(prompt, max_new_tokens=4, steps=4, return_dict_in_generate=True, logits_mask_inf=True)
    assert (official == MASK_ID).any()  # the official quirk this fixes
    assert not (ours.sequences == MASK_ID).any() and ours.nfe == 4
    batch = _prompts(seed=5, batch=2, length=8)
    batch[0, 2], batch[1, 5:7] = MASK_ID, MASK_ID
    out = model.generate(batch, max_new_tokens=8, block_length=4, steps=8, logits_mask_inf=True)
    assert not (out == MASK_ID).any()
    filled = model.infill(torch.tensor([[MASK_ID, 7, MASK_ID, MASK_ID, 9]]), steps=2, logits_mask_inf=True)
    assert not (filled == MASK_ID).any()


# ---- 9. a left-padded batch without attention_mask ----------------------------------------------


def test_leading_pad_tokens_without_attention_mask_warn(model):
    ids, mask = left_padded_batch([[5, 6, 7], [8]])
    assert int(ids[1, 0]) == PAD_ID
    with pytest.warns(UserWarning, match="attention_mask"):
        model.generate(ids, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, attention_mask=mask, max_new_tokens=4)


# ---- 10. inputs in other forms -------------------------------------------------------------------


def test_a_dict_generation_config_and_python_lists_are_accepted(model):
    prompt = _prompts(length=3)
    expected = model.generate(prompt, max_new_tokens=4, steps=4)
    assert torch.equal(model.generate(prompt, generation_config={"max_new_tokens": 4, "steps": 4,
                                                                 "mask_token_id": MASK_ID}), expected)
    assert torch.equal(model.generate(prompt[0].tolist(), max_new_tokens=4, steps=4), expected)
    ragged = model.generate([[5, 6, 7], [8]], max_new_tokens=4)
    ids, mask = left_padded_batch([[5, 6, 7], [8]])
    assert torch.equal(ragged, model.generate(ids, attention_mask=mask, max_new_tokens=4))
    with pytest.raises(TypeError, match="token ids"):
        model.generate([["a", "b"]], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        model.generate([[5], []], max_new_tokens=4)
    with pytest.raises(TypeError, match="generation_config"):
        model.generate(prompt, generation_config=42)


def test_unknown_keys_in_a_dict_config_are_refused_and_a_plain_generation_config_is_accepted(model):
    prompt = _prompts(length=3)
    with pytest.raises(TypeError, match=r"`generation_config` has keys that generate\(\) does not know: \['step'\]"):
        model.generate(prompt, generation_config={"step": 2})
    expected = model.generate(prompt, max_new_tokens=4, steps=4)
    plain = GenerationConfig(max_new_tokens=4, steps=4)  # transformers' class, as a user of transformers passes it
    assert torch.equal(model.generate(prompt, generation_config=plain), expected)
    with pytest.raises(ValueError, match="num_beams"):  # what it sets is checked as keywords are
        model.generate(prompt, generation_config=GenerationConfig(num_beams=4))


def test_options_table_builds_the_config():
    config = DiffusionGenerationConfig()
    for option in DIFFUSION_OPTIONS:
        assert getattr(config, option.name) == option.default, option.name
        assert option.help
    with pytest.raises(ValueError, match="`kv_cache`"):
        DiffusionGenerationConfig(kv_cache="triple")


def test_readme_tables_list_every_option_and_field():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "docs" / "generation.md").read_text()  # the README's reference page
    for option in DIFFUSION_OPTIONS:
        assert f"| `{option.name}` | `{option.default!r}` | {option.help} |" in readme, option.name
    for name in list(HONOURED_FIELDS) + list(REFUSED_FIELDS):
        assert f"`{name}`" in readme, name


def test_every_diffusion_setting_with_a_cli_type_is_a_cli_flag():
    import argparse
    from pathlib import Path

    from llada_hf.loading import generation_kwargs
    from llada_hf_cli import add_generation_options

    parser = argparse.ArgumentParser()
    add_generation_options(parser)
    readme = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()  # the command line's reference page
    for option in DIFFUSION_OPTIONS:
        if option.cli_type is None:
            continue
        flag = "--" + option.name.replace("_", "-")
        assert flag in readme, flag
        value = {int: ["3"], float: ["0.5"], str: [(option.choices or ("x",))[0]], bool: []}[option.cli_type]
        args = parser.parse_args([flag, *value])
        assert option.name in generation_kwargs(args), option.name


# ---- non-finite logits stop the run ---------------------------------------------------------------


@pytest.mark.parametrize("break_it", ["nan_weights", "nan_embeds", "nan_processor", "everything_forbidden"])
def test_non_finite_logits_stop_with_an_error_naming_the_step(break_it):
    from transformers import LogitsProcessor, LogitsProcessorList

    model, prompt, kwargs = tiny_model(seed=2), _prompts(seed=1), dict(max_new_tokens=4, steps=4)
    if break_it == "nan_weights":
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    elif break_it == "nan_embeds":
        embeds = model.get_input_embeddings()(prompt)
        embeds[0, 1, 3] = float("nan")
        prompt, kwargs = None, dict(kwargs, inputs_embeds=embeds)
    elif break_it == "nan_processor":
        class NaNProcessor(LogitsProcessor):
            def __call__(self, input_ids, scores):
                return scores * float("nan")

        kwargs["logits_processor"] = LogitsProcessorList([NaNProcessor()])
    else:  # refused up front now (test below); a processor that forbids every token reaches the step
        class ForbidAll(LogitsProcessor):
            def __call__(self, input_ids, scores):
                return torch.full_like(scores, float("-inf"))

        kwargs["logits_processor"] = LogitsProcessorList([ForbidAll()])
    with pytest.raises(ValueError, match=r"Decoding step 0: the logits are not finite"):
        model.generate(prompt, **kwargs) if prompt is not None else model.generate(**kwargs)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(suppress_tokens=[-1]), r"`suppress_tokens` must be a token id \(an int >= 0\)"),
    (dict(eos_token_id=-7), r"`eos_token_id` must be a token id"),
    (dict(eot_token_id=True), r"`eot_token_id` must be a token id"),
    (dict(suppress_tokens=[5, 10_000]), r"`suppress_tokens` names id 10000, outside the model's vocabulary"),
    (dict(mask_token_id=EMBEDDING_ROWS), r"`mask_token_id` names id 104, outside"),
    (dict(suppress_tokens=list(range(EMBEDDING_ROWS))), r"covers all 104 tokens"),
])
def test_token_ids_are_checked_not_taken_at_face_value(model, settings, message):
    with pytest.raises(ValueError, match=message):
        model.generate(_prompts(length=3), max_new_tokens=4, **settings)
