"""Diffusion generation: exactness against the official sampler, distributions, HF integration, errors."""

import math

import pytest
import torch
from helpers import EOS_ID, EOT_ID, MASK_ID, left_padded_batch, tiny_model
from llada_reference import reference_generate

from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from llada_hf.decoding_llada import DiffusionGenerationOutput, RemaskingStrategy, plan_blocks, tokens_per_step
from llada_hf.generation_llada import DiffusionGenerationConfig
from llada_hf.streaming_llada import TextDiffusionStreamer


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _model_fn(model):
    return lambda ids, mask: model(ids, attention_mask=mask).logits


def _prompts(seed=0, batch=1, length=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 90, (batch, length), generator=g)


# ---- exactness at temperature 0 -------------------------------------------------------------------

EXACT_CASES = {
    "one_block": dict(gen_length=16, block_length=16, steps=16),
    "semi_ar_blocks": dict(gen_length=16, block_length=4, steps=16),
    "fewer_steps_than_tokens": dict(gen_length=16, block_length=8, steps=6),
    "cfg": dict(gen_length=12, block_length=4, steps=12, cfg_scale=1.5),
    "logits_eos_inf": dict(gen_length=12, block_length=4, steps=12, logits_eos_inf=True),
    "confidence_eos_eot_inf": dict(gen_length=12, block_length=6, steps=12, confidence_eos_eot_inf=True),
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_greedy_generate_equals_the_official_sampler(model, case):
    settings = EXACT_CASES[case]
    prompt = _prompts(seed=len(case), batch=2)
    ours = model.generate(
        prompt, max_new_tokens=settings["gen_length"], eot_token_id=EOT_ID,
        **{k: v for k, v in settings.items() if k != "gen_length"},
    )
    ref = reference_generate(_model_fn(model), prompt, mask_id=MASK_ID, eos_id=EOS_ID, eot_id=EOT_ID, **settings)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_left_padded_batch_equals_the_official_sampler_and_each_row_alone(model, cfg_scale):
    rows = [[5, 9, 12, 40, 41, 42, 43], [7, 8], [30, 31, 32, 33]]
    ids, mask = left_padded_batch(rows)
    settings = dict(max_new_tokens=12, block_length=4, steps=12, cfg_scale=cfg_scale)
    ours = model.generate(ids, attention_mask=mask, **settings)
    ref = reference_generate(_model_fn(model), ids, attention_mask=mask, gen_length=12, block_length=4, steps=12,
                             cfg_scale=cfg_scale, mask_id=MASK_ID)
    assert torch.equal(ours, ref)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), **settings)
        assert torch.equal(ours[i, -12:], alone[0, -12:])


def test_cfg_without_attention_mask(model):
    prompt = _prompts(seed=4)
    ours = model.generate(prompt, max_new_tokens=8, block_length=4, steps=8, cfg_scale=1.0)
    ref = reference_generate(_model_fn(model), prompt, gen_length=8, block_length=4, steps=8, cfg_scale=1.0,
                             mask_id=MASK_ID)
    assert torch.equal(ours, ref)


def test_infill_fills_every_mask_and_keeps_the_rest(model):
    ids = _prompts(seed=6, batch=2, length=10)
    ids[0, [1, 4, 8]] = MASK_ID
    ids[1, 3] = MASK_ID
    out = model.infill(ids, return_dict_in_generate=True, logits_eos_inf=True)
    committed = out.commit_step >= 0  # infill: every position of the sequence is "answer"
    assert committed[ids == MASK_ID].all() and not committed[ids != MASK_ID].any()
    keep = ids != MASK_ID
    assert torch.equal(out.sequences[keep], ids[keep])
    assert out.nfe == 3  # one step per mask of the longest row
    with pytest.raises(ValueError, match="no mask token"):
        model.infill(_prompts())


# ---- uneven settings ------------------------------------------------------------------------------


def test_plan_and_schedule_rules():
    assert [(b.start, b.end, b.steps) for b in plan_blocks(3, 16, 4, 16)] == [(3, 7, 4), (7, 11, 4), (11, 15, 4),
                                                                               (15, 19, 4)]
    # a shorter last block, remainder steps to the first blocks, steps clipped to the block size
    assert [(b.start, b.end, b.steps) for b in plan_blocks(0, 10, 4, 7)] == [(0, 4, 3), (4, 8, 2), (8, 10, 2)]
    assert [b.steps for b in plan_blocks(0, 6, 3, 100)] == [3, 3]
    with pytest.raises(ValueError, match="number of blocks"):
        plan_blocks(0, 16, 4, 3)
    assert tokens_per_step(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_uneven_settings_run_and_fill_everything(model):
    out = model.generate(_prompts(batch=2), max_new_tokens=10, block_length=4, steps=7, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 16) and out.commit_step.ge(0).all()  # every answer position committed
    assert out.nfe == 7
    clipped = model.generate(_prompts(), max_new_tokens=4, steps=100, return_dict_in_generate=True)
    assert clipped.nfe == 4


# ---- sampling distributions -----------------------------------------------------------------------


def _small_vocab_model():
    # Vocabulary of 8 (mask = 7): the exact law of a 2-token answer can be enumerated.
    return tiny_model(seed=11, vocab_size=8, mask_token_id=7, pad_token_id=0, eos_token_id=0, bos_token_id=1)


def _exact_two_token_law(model, prompt, temperature, remasking):
    """P(answer = (a, b)) for one block of 2 tokens decoded in 2 steps, by enumeration."""
    vocab, mask = 7, 7  # candidates never include the mask token's own id? they may: keep the full vocab
    vocab = model.config.vocab_size
    P = prompt.shape[1]

    def probs(seq):  # softmax(logits / T) at the two answer positions, and the untempered softmax
        with torch.no_grad():
            logits = model(seq).logits[:, P:].double()
        return (logits / temperature).softmax(-1), logits.softmax(-1)

    both_masked = torch.cat([prompt, torch.full((1, 2), mask)], 1)
    sample0, conf0 = probs(both_masked)
    law = torch.zeros(vocab, vocab, dtype=torch.float64)
    # second-step laws given the first committed token at position 0 or at position 1
    first_at_0 = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None], torch.full((vocab, 1), mask)], 1)
    first_at_1 = torch.cat([prompt.expand(vocab, -1), torch.full((vocab, 1), mask), torch.arange(vocab)[:, None]], 1)
    then_1 = probs(first_at_0)[0][:, 1]  # [a, b]: P(b at pos 1 | a at pos 0)
    then_0 = probs(first_at_1)[0][:, 0]  # [b, a]: P(a at pos 0 | b at pos 1)
    for s0 in range(vocab):
        for s1 in range(vocab):
            p_draw = sample0[0, 0, s0] * sample0[0, 1, s1]
            if remasking == "random":
                commit_0 = 0.5
            else:  # low confidence: the candidate with the higher untempered probability goes first
                commit_0 = 1.0 if conf0[0, 0, s0] > conf0[0, 1, s1] else 0.0
            law[s0, :] += p_draw * commit_0 * then_1[s0]
            law[:, s1] += p_draw * (1 - commit_0) * then_0[s1]
    return law


def _chi_square_quantile(df, z=3.29):  # Wilson-Hilferty; z = 3.29 ~ p = 0.0005
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("remasking", ["random", "low_confidence"])
def test_sampling_follows_the_exact_law(remasking):
    model = _small_vocab_model()
    prompt = torch.tensor([[1, 3, 5]])
    temperature, draws = 0.8, 6000
    law = _exact_two_token_law(model, prompt, temperature, remasking)
    generator = torch.Generator().manual_seed(0)
    out = model.generate(prompt.expand(draws, -1).contiguous(), max_new_tokens=2, steps=2, temperature=temperature,
                         remasking=remasking, generator=generator)
    counts = torch.zeros_like(law)
    counts.index_put_((out[:, -2], out[:, -1]), torch.ones(draws, dtype=torch.float64), accumulate=True)
    expected = law.flatten() * draws
    observed = counts.flatten()
    keep = expected >= 5  # pool the rare cells
    stat = (((observed[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    rare_expected, rare_observed = expected[~keep].sum(), observed[~keep].sum()
    if rare_expected > 0:
        stat += (rare_observed - rare_expected) ** 2 / rare_expected
    df = int(keep.sum()) - (0 if rare_expected > 0 else 1)
    assert stat < _chi_square_quantile(df), f"chi-square {stat:.1f} with {df} degrees of freedom"
    assert abs(law.sum().item() - 1) < 1e-9


def test_a_generator_makes_sampling_reproducible(model):
    prompt = _prompts(batch=2)
    runs = [
        model.generate(prompt, max_new_tokens=8, steps=8, temperature=1.0, remasking="random",
                       generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_top_k_one_is_greedy(model):
    prompt = _prompts(batch=2)
    sampled = model.generate(prompt, max_new_tokens=8, steps=8, temperature=2.0, top_k=1)
    assert torch.equal(sampled, model.generate(prompt, max_new_tokens=8, steps=8))
    nucleus = model.generate(prompt, max_new_tokens=8, steps=8, temperature=2.0, top_p=1e-6)
    assert torch.equal(nucleus, sampled)


@pytest.mark.parametrize("remasking", ["margin", "entropy", "random"])
def test_other_strategies_fill_every_position(model, remasking):
    out = model.generate(_prompts(batch=2), max_new_tokens=8, steps=8, block_length=4, remasking=remasking,
                         return_dict_in_generate=True)
    assert out.commit_step.ge(0).all() and out.nfe == 8


class LeftToRight(RemaskingStrategy):
    name = "left_to_right_test"

    def score(self, logits, candidates, generator=None):
        positions = torch.arange(candidates.shape[1], dtype=torch.float64, device=candidates.device)
        return (-positions).expand(candidates.shape).clone()


def test_a_user_strategy_instance_is_used(model):
    out = model.generate(_prompts(), max_new_tokens=6, steps=6, remasking=LeftToRight(),
                         return_dict_in_generate=True)
    assert out.commit_step[0].tolist() == [0, 1, 2, 3, 4, 5]


# ---- outputs, processors, stopping ----------------------------------------------------------------


def test_dict_output_history_and_commit_steps(model):
    out = model.generate(_prompts(batch=2), max_new_tokens=8, steps=4, block_length=4,
                         return_dict_in_generate=True, output_history=True)
    assert isinstance(out, DiffusionGenerationOutput)
    assert out.nfe == 4 and len(out.history) == 4
    assert torch.equal(out.history[-1], out.sequences)
    assert sorted(out.commit_step[0].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert out.tokens_per_forward.tolist() == [2.0, 2.0]
    masks_left = [int((h[:, 6:] == MASK_ID).sum()) for h in out.history]
    assert masks_left == [12, 8, 4, 0]


class OnlyToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0
        return forced


def test_logits_processors_are_applied_at_every_step(model):
    out = model.generate(_prompts(), max_new_tokens=6, steps=6, logits_processor=LogitsProcessorList([OnlyToken(9)]))
    assert out[0, -6:].tolist() == [9] * 6


class FavourMask(LogitsProcessor):
    def __call__(self, input_ids, scores):
        favoured = scores.clone()
        favoured[:, MASK_ID] += 100.0
        return favoured


def test_logits_mask_inf_keeps_the_mask_token_out_of_the_answer(model):
    favour = LogitsProcessorList([FavourMask()])
    # As the official sampler: the mask token can be a candidate, and a committed one leaves its position masked
    plain = model.generate(_prompts(), max_new_tokens=6, steps=6, logits_processor=favour)
    assert plain[:, -6:].eq(MASK_ID).all()
    forbidden = model.generate(_prompts(), max_new_tokens=6, steps=6, logits_processor=favour, logits_mask_inf=True)
    assert not forbidden[:, -6:].eq(MASK_ID).any()


def test_early_exit_fills_with_eos_and_stops(model):
    out = model.generate(_prompts(batch=2), max_new_tokens=8, steps=8, remasking=LeftToRight(), early_exit=True,
                         logits_processor=LogitsProcessorList([OnlyToken(EOS_ID)]), return_dict_in_generate=True)
    assert out.nfe == 1
    assert out.sequences[:, -8:].eq(EOS_ID).all()
    assert out.commit_step[:, 0].tolist() == [0, 0] and out.commit_step[:, 1:].eq(-1).all()


def test_early_exit_keeps_the_tokens_before_eos(model):
    prompt = _prompts(seed=9, batch=3)
    full = model.generate(prompt, max_new_tokens=16, steps=16, block_length=4)
    early = model.generate(prompt, max_new_tokens=16, steps=16, block_length=4, early_exit=True)
    for row_full, row_early in zip(full[:, 6:], early[:, 6:]):
        eos = (row_full == EOS_ID).nonzero()
        cut = int(eos[0]) + 1 if len(eos) else len(row_full)
        assert torch.equal(row_full[:cut], row_early[:cut])
        assert row_early[cut:].eq(EOS_ID).all()


class StopAfter(StoppingCriteria):
    def __init__(self, calls):
        self.calls, self.seen = calls, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.seen += 1
        return torch.full((input_ids.shape[0],), self.seen >= self.calls, dtype=torch.bool)


def test_stopping_criteria_end_generation(model):
    out = model.generate(_prompts(), max_new_tokens=8, steps=8, stopping_criteria=StoppingCriteriaList([StopAfter(3)]),
                         return_dict_in_generate=True)
    assert out.nfe == 3
    assert int((out.sequences[0, -8:] == EOS_ID).sum()) >= 5


# ---- streamers and pipeline -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_and_model():
    from llada_hf import LladaConfig, LladaForMaskedDiffusion
    from llada_hf.tokenization import model_token_ids, train_tokenizer

    texts = [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "bird") for v in ("red", "blue", "green")]
    tokenizer = train_tokenizer(texts * 5, vocab_size=300)
    torch.manual_seed(0)
    config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         **model_token_ids(tokenizer))
    return tokenizer, LladaForMaskedDiffusion(config).eval()


class Recording(TextDiffusionStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.puts, self.finalized = [], []

    def put(self, value):
        self.puts.append(value.clone())
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        self.finalized.append(text)


def test_streamers_get_blocks_and_drafts(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    ids = tokenizer("the cat sat", return_tensors="pt").input_ids
    streamer = Recording(tokenizer)
    out = model.generate(ids, max_new_tokens=8, steps=8, block_length=4, streamer=streamer)
    assert [p.shape[-1] for p in streamer.puts] == [ids.shape[1], 4, 4]  # the prompt, then block by block
    assert torch.equal(torch.cat([p.reshape(-1) for p in streamer.puts[1:]]), out[0, ids.shape[1]:])
    assert len(streamer.drafts) == 8 and streamer.drafts[0].count("░") == 7
    assert "".join(streamer.finalized) == tokenizer.decode(out[0, ids.shape[1]:])


def test_text_generation_pipeline(tokenizer_and_model):
    from transformers import pipeline

    tokenizer, model = tokenizer_and_model
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    ids = tokenizer("the dog sat", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=6, steps=6)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    # The pipeline samples (T 0.7) unless the model's generation config says `do_sample: false`, which ours saves:
    # its default is greedy, as the model's own
    assert model.generation_config.to_diff_dict()["do_sample"] is False
    for _ in range(3):
        result = generator("the dog sat", max_new_tokens=6, steps=6, return_full_text=False)
        assert result[0]["generated_text"] == expected
    sampled = generator("the dog sat", max_new_tokens=6, steps=6, return_full_text=False, do_sample=True)
    assert isinstance(sampled[0]["generated_text"], str)  # and it still samples when asked


# ---- generation config ----------------------------------------------------------------------------


def test_generation_config_round_trip_and_overrides(tmp_path, model):
    model.generation_config.block_length = 4
    model.generation_config.steps = 8
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(tmp_path)
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded.generation_config) is DiffusionGenerationConfig
    assert (reloaded.generation_config.block_length, reloaded.generation_config.steps) == (4, 8)
    assert DiffusionGenerationConfig.from_pretrained(tmp_path).mask_token_id == MASK_ID
    prompt = _prompts()
    default = reloaded.generate(prompt, return_dict_in_generate=True)
    assert default.nfe == 8 and default.sequences.shape[1] == 14
    overridden = reloaded.generate(prompt, max_new_tokens=4, steps=2, return_dict_in_generate=True)
    assert overridden.nfe == 2 and overridden.sequences.shape[1] == 10
    assert reloaded.generation_config.steps == 8  # a call's overrides do not stick
    explicit = reloaded.generate(prompt, generation_config=DiffusionGenerationConfig(max_new_tokens=3, steps=3))
    assert explicit.shape[1] == 9


# ---- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_length=0), "block_length"),
        (dict(steps=-1), "steps"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(remasking="best_first"), "remasking"),
        (dict(temperature=-0.5), "temperature"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(pad_token_id=MASK_ID), "pad_token_id"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=16, block_length=2, steps=4), "number of blocks"),
        (dict(not_a_field=1), "unexpected"),
    ],
)
def test_bad_settings_get_clear_errors(model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(_prompts(), **kwargs)


def test_bad_inputs_get_clear_errors(model):
    prompt = _prompts(batch=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(prompt, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(prompt, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="all zeros"):
        model.generate(prompt, attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        model.generate(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="to\\(model.device\\)"):
        model.generate(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="max_length"):
        model.generate(prompt, max_length=6)  # no room for an answer
    no_mask = tiny_model(mask_token_id=None)
    with pytest.raises(ValueError, match="mask_token_id"):
        no_mask.generate(prompt)


def test_the_prompt_ids_are_checked_once_per_call_not_at_every_step(model, monkeypatch):
    """The model's range check costs host syncs; `generate` runs it once on the prompt, and its forwards skip it
    (every later id is one the sampler committed). A direct call of the model still checks."""
    import llada_hf.generation_llada
    import llada_hf.modeling_llada
    from llada_hf.configuration_llada import check_token_ids

    calls = {"generate": 0, "forward": 0}

    def counting(key):
        def check(input_ids, vocab_size):
            calls[key] += 1
            check_token_ids(input_ids, vocab_size)
        return check

    monkeypatch.setattr(llada_hf.generation_llada, "check_token_ids", counting("generate"))
    monkeypatch.setattr(llada_hf.modeling_llada, "check_token_ids", counting("forward"))
    out = model.generate(_prompts(), max_new_tokens=8, steps=8, block_length=4, cfg_scale=1.0,
                         return_dict_in_generate=True)
    assert out.nfe == 8 and calls == {"generate": 1, "forward": 0}
    holes = out.sequences.clone()
    holes[0, [0, 3, 9]] = MASK_ID
    assert model.infill(holes, return_dict_in_generate=True).nfe == 3
    assert calls == {"generate": 2, "forward": 0}
    model(out.sequences)
    assert calls["forward"] == 1
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 104\)"):
        model.generate(torch.tensor([[5, 104]]), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 104\)"):
        model.infill(torch.tensor([[-1, MASK_ID]]))
