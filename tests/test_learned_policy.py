"""The learned unmasking policy (issue 29): it only adds commits to the schedule (a policy that never fires is the
exact sampler, in `generate`, with caches and in the engine), it is deterministic, it saves and loads with the
generation config (also from a `trust_remote_code` bundle), malformed policies are refused, and no policy can keep a
block from ending within its steps. Learning it: `learn_decoding_policy` and `llada-hf tune --learn`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import MASK_ID, left_padded_batch, save_tiny_text_model, tiny_model

from llada_hf.decoding_llada import DiffusionEngine
from llada_hf.generation_llada import DiffusionGenerationConfig
from llada_hf.policy_llada import (
    BLOCK_FEATURES,
    POSITION_FEATURES,
    DecodingPolicy,
    LearnedDecodingPolicy,
    StepSignals,
)
from llada_hf.trainers.policy import PolicyTrainingConfig, collect_policy_traces, learn_decoding_policy


pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by the test command (pyproject.toml)

# Reads every feature, never fires (threshold 1): must give the sampler's own tokens.
NEVER = {"features": list(POSITION_FEATURES), "weights": [1.0] * len(POSITION_FEATURES), "bias": 0.0,
         "threshold": 1.0, "block_done": {"features": list(BLOCK_FEATURES), "weights": [1.0] * len(BLOCK_FEATURES),
                                          "threshold": 1.0}}
# Fires on the tiny model now and then: a confident candidate, or a less confident one whose argmax held for steps;
# and the block-done head late in a block whose masks are all fairly confident.
FIRING = {"features": ["confidence", "stable_steps"], "weights": [10.0, 1.0], "bias": -5.0, "threshold": 0.5,
          "block_done": {"features": ["min_confidence", "block_progress"], "weights": [10.0, 4.0], "bias": -4.0,
                         "threshold": 0.5}}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


class Ids:
    """A stand-in tokenizer: a prompt is space-separated token ids."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [int(token) for token in text.split()]})


PROMPTS = [" ".join(str(5 + (i * 7 + j * 3) % 80) for j in range(3 + i % 3)) for i in range(12)]


class Nothing(DecodingPolicy):
    """Commits nothing beyond the schedule, ever."""

    def decide(self, signals):
        return torch.zeros_like(signals.eligible), torch.zeros_like(signals.block_start, dtype=torch.bool)


class Everything(DecodingPolicy):
    """Asks to commit every window position, eligible or not, and calls every block done."""

    def decide(self, signals):
        return torch.ones_like(signals.eligible), torch.ones_like(signals.block_start, dtype=torch.bool)


# ---- the signals ---------------------------------------------------------------------------------------------------


def test_step_signals_compute_the_documented_features():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]])
    signals = StepSignals(rows=torch.tensor([0]), logits=probs.log(), candidates=torch.tensor([[0, 1]]),
                          eligible=torch.tensor([[True, False]]), columns=torch.tensor([[10, 11]]),
                          block_start=torch.tensor([10]), block_end=torch.tensor([14]),
                          block_step=torch.tensor([1]), block_steps=torch.tensor([4]),
                          stable_steps=torch.tensor([[3, 40]]))
    entropy = -(0.7 * torch.tensor(0.7).log() + 0.2 * torch.tensor(0.2).log() + 0.1 * torch.tensor(0.1).log())
    expected = {"confidence": [0.7, 0.5], "margin": [0.5, 0.0], "entropy": [float(entropy), 0.6931472],  # ln 2
                "block_position": [0.0, 0.25], "block_progress": [0.25, 0.25], "masked_fraction": [0.25, 0.25],
                "stable_steps": [3.0, 16.0]}
    for name, values in expected.items():
        torch.testing.assert_close(signals.position_feature(name), torch.tensor([values]), msg=name)
    blocks = signals.block_features(list(BLOCK_FEATURES))  # summaries of the eligible position only
    torch.testing.assert_close(blocks, torch.tensor([[0.7, 0.7, 0.5, float(entropy), 3.0, 0.25, 0.25]]))


# ---- exactness: a policy that never fires is the sampler itself ----------------------------------------------------


SETTINGS = {
    "one block": dict(max_new_tokens=12, steps=12),
    "semi-AR, two per step": dict(max_new_tokens=16, steps=8, block_length=4),
    "prefix cache": dict(max_new_tokens=16, steps=16, block_length=8, kv_cache="prefix"),
    "dual cache + threshold": dict(max_new_tokens=16, steps=16, block_length=8, kv_cache="dual",
                                   confidence_threshold=0.3),
    "cfg + margin": dict(max_new_tokens=8, steps=8, block_length=4, cfg_scale=1.0, remasking="margin"),
    "entropy bound + early exit": dict(max_new_tokens=16, block_length=8, entropy_bound=0.5, early_exit=True),
    "sampling": dict(max_new_tokens=8, steps=8, block_length=4, temperature=1.0),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("policy", [NEVER, Nothing()], ids=["never-firing numbers", "object"])
def test_a_policy_that_never_fires_gives_the_default_tokens(model, name, policy):
    ids, mask = left_padded_batch([[5, 9, 12, 40, 41], [7, 8], [30, 31, 32]])
    settings = dict(SETTINGS[name], attention_mask=mask, return_dict_in_generate=True)
    if "temperature" in settings:
        settings["generator"] = torch.Generator().manual_seed(0)
    expected = model.generate(ids, **settings)
    if "temperature" in settings:
        settings["generator"] = torch.Generator().manual_seed(0)
    out = model.generate(ids, decoding_policy=policy, **settings)
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(out.commit_step, expected.commit_step) and out.nfe == expected.nfe


def test_infill_with_a_never_firing_policy_is_infill(model):
    ids = torch.tensor([[5, MASK_ID, 9, MASK_ID, MASK_ID, 12, MASK_ID]])
    assert torch.equal(model.infill(ids, decoding_policy=NEVER), model.infill(ids))


REQUESTS = [  # (prompt, settings): the longer prompts come later (the running rows get columns on their left)
    ([7, 8], dict(max_new_tokens=12, block_length=4)),
    ([5, 9, 12, 40], dict(max_new_tokens=12, block_length=4)),
    ([30, 31, 32, 33, 34, 35], dict(max_new_tokens=12, block_length=4, kv_cache="dual")),
    ([11, 12, 13], dict(max_new_tokens=12, block_length=4)),
]


@pytest.mark.parametrize("policy", [NEVER, FIRING], ids=["never", "firing"])
def test_in_the_engine_rows_that_join_get_what_they_get_alone(model, policy):
    engine, ids = DiffusionEngine(model), {}
    for step in range(8):
        if step % 2 == 0 and step // 2 < len(REQUESTS):
            prompt, settings = REQUESTS[step // 2]
            [ids[step // 2]] = engine.add(torch.tensor([prompt]), decoding_policy=policy, **settings)
        engine.step()
    assert len(engine.states) == 2  # three requests share one state (rows joined as cohorts), the cached one its own
    while engine.has_unfinished:
        engine.step()
    for index, (prompt, settings) in enumerate(REQUESTS):
        alone = model.generate(torch.tensor([prompt]), decoding_policy=policy, **settings)[0]
        assert torch.equal(engine.pop(ids[index]), alone), index
        if policy is NEVER:
            assert torch.equal(alone, model.generate(torch.tensor([prompt]), **settings)[0])


# ---- a policy that fires --------------------------------------------------------------------------------------------


def test_a_firing_policy_commits_early_deterministically(model):
    ids, mask = left_padded_batch([[5, 9, 12, 40, 41], [7, 8]])
    settings = dict(attention_mask=mask, max_new_tokens=16, block_length=8, return_dict_in_generate=True)
    exact = model.generate(ids, **settings)
    first = model.generate(ids, decoding_policy=FIRING, **settings)
    again = model.generate(ids, decoding_policy=LearnedDecodingPolicy(FIRING), **settings)
    assert torch.equal(first.sequences, again.sequences) and first.nfe == again.nfe
    assert first.nfe < exact.nfe  # it ended blocks sooner
    assert not bool((first.sequences == MASK_ID).all(1).any())


def test_the_block_done_head_commits_the_rest_of_the_block(model):
    done = {"features": ["confidence"], "weights": [0.0], "threshold": 1.0,
            "block_done": {"features": ["block_progress"], "weights": [0.0], "bias": 5.0, "threshold": 0.5}}
    ids = torch.tensor([[5, 9, 12]])
    out = model.generate(ids, max_new_tokens=12, block_length=4, decoding_policy=done, return_dict_in_generate=True)
    assert out.nfe == 3  # one step per block
    assert torch.equal(out.sequences[:, :3], ids) and not bool((out.sequences == MASK_ID).any())


# ---- bad policies ---------------------------------------------------------------------------------------------------


def test_a_policy_that_commits_nothing_is_bounded_by_the_schedule(model):
    ids = torch.tensor([[5, 9, 12]])
    for steps in (12, 6, None):  # None: adaptive steps, one per position as the bound
        settings = dict(max_new_tokens=12, steps=steps, block_length=4, return_dict_in_generate=True)
        out = model.generate(ids, decoding_policy=Nothing(), **settings)
        assert out.nfe == (steps or 12) and torch.equal(out.sequences, model.generate(ids, **settings).sequences)
    engine = DiffusionEngine(model)
    [row] = engine.add(ids, max_new_tokens=12, steps=6, block_length=4, decoding_policy=Nothing())
    taken = 0
    while engine.has_unfinished:
        engine.step()
        taken += 1
    assert taken == 6 and not bool((engine.pop(row) == MASK_ID).any())


def test_a_policy_that_asks_for_everything_commits_only_masks(model):
    ids, mask = left_padded_batch([[5, 9, 12, 40], [7, 8]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, block_length=4, decoding_policy=Everything(),
                         return_dict_in_generate=True)
    assert out.nfe == 2 and torch.equal(out.sequences[:, :4], ids)


def test_a_policy_with_wrong_shapes_is_refused(model):
    class Wrong(DecodingPolicy):
        def decide(self, signals):
            return torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)

    with pytest.raises(ValueError, match=r"Wrong.decide returned commit \(1, 1\)"):
        model.generate(torch.tensor([[5, 9], [7, 8]]), max_new_tokens=4, decoding_policy=Wrong())


def _with(**changes):
    spec = json.loads(json.dumps(FIRING))
    for key, value in changes.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    return spec


MALFORMED = [
    ("a string", "learned policy's dict of numbers"),
    (_with(features=None), "`features` must be a non-empty list"),
    (_with(features=["confidence", "luck"]), "`features` names 'luck'"),
    (_with(weights=[1.0]), r"`weights` needs 2 numbers \(one per feature\), got 1"),
    (_with(weights=[1.0, float("nan")]), "`weights` needs 2 numbers"),
    (_with(weights=[True, 1.0]), "`weights` needs 2 numbers"),
    (_with(threshold=0), r"`threshold` must be a number in \(0, 1\]"),
    (_with(threshold=1.5), r"`threshold` must be a number in \(0, 1\]"),
    (_with(hidden=[[1.0, 2.0]]), "`hidden_bias` needs 1 finite numbers"),
    (_with(hidden=[[1.0]], hidden_bias=[0.0]), "`hidden` must be a list of rows of 2"),
    (_with(temperature=1.0), r"unknown key\(s\) \['temperature'\]"),
    (_with(version=2), "`version` 2 is not supported"),
    (_with(block_done={"features": ["confidence"], "weights": [1.0], "threshold": 0.5}),
     "`block_done.features` names 'confidence'"),
]


@pytest.mark.parametrize("bad, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_policies_are_refused_with_the_key_named(model, bad, message):
    with pytest.raises(ValueError, match=r"`decoding_policy`.*" + message):
        model.generate(torch.tensor([[5, 9]]), max_new_tokens=4, decoding_policy=bad)
    with pytest.raises(ValueError, match=message):
        DiffusionGenerationConfig(decoding_policy=bad)
    if isinstance(bad, dict):
        with pytest.raises(ValueError, match=message):
            LearnedDecodingPolicy(bad)


# ---- saving and loading ---------------------------------------------------------------------------------------------


def test_the_policy_is_saved_and_loaded_with_the_model(model, tmp_path):
    from transformers import AutoModel

    import llada_hf  # noqa: F401  (registers the Auto classes)

    ids = torch.tensor([[5, 9, 12, 40]])
    settings = dict(max_new_tokens=12, block_length=4)
    expected = model.generate(ids, decoding_policy=FIRING, **settings)
    model.generation_config.decoding_policy = LearnedDecodingPolicy(FIRING)  # an object saves as its numbers
    try:
        model.save_pretrained(tmp_path / "ckpt")
        assert torch.equal(model.generate(ids, **settings), expected)
    finally:
        model.generation_config.decoding_policy = None
    saved = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert saved["decoding_policy"] == FIRING and (tmp_path / "ckpt" / "policy_llada.py").is_file()
    reloaded = AutoModel.from_pretrained(tmp_path / "ckpt").eval()
    assert reloaded.generation_config.decoding_policy == FIRING
    assert torch.equal(reloaded.generate(ids, **settings), expected)  # no extra code: the config carries it
    torch.save({"ids": ids, "expected": expected}, tmp_path / "case.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["llada_hf"] = None  # any `import llada_hf` now fails
        sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert "llada_hf" not in type(model).__module__
        case = torch.load({str(tmp_path / "case.pt")!r})
        out = model.generate(case["ids"], max_new_tokens=12, block_length=4)
        print(bool(torch.equal(out, case["expected"])), type(model.generation_config).__module__)
        """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "True" and "transformers_modules" in result.stdout


# ---- learning it ----------------------------------------------------------------------------------------------------


def test_learning_is_deterministic_and_gives_a_usable_policy(model):
    config = PolicyTrainingConfig(max_new_tokens=8, block_length=4, batch_size=4, iterations=100)
    policy = learn_decoding_policy(model, Ids(), PROMPTS, config)
    assert learn_decoding_policy(model, Ids(), PROMPTS, config) == policy
    assert LearnedDecodingPolicy(policy).to_dict() == policy  # valid, and JSON-able as it is
    json.dumps(policy)
    info = policy["info"]
    assert info["prompts"] == 12 and info["held_out_prompts"] == 3 and 0 < info["final_share"] <= 1
    assert 0.5 <= policy["threshold"] <= 1
    out = model.generate(torch.tensor([[5, 9, 12]]), max_new_tokens=8, block_length=4, decoding_policy=policy,
                         return_dict_in_generate=True)
    assert out.nfe <= 8


def test_traces_label_what_the_exact_decoder_committed(model):
    config = PolicyTrainingConfig(max_new_tokens=8, block_length=4, batch_size=5)
    traces = collect_policy_traces(model, Ids(), PROMPTS[:5], config)
    # every masked position at every step: per prompt, 4 + 3 + 2 + 1 masks in each of the two blocks
    assert len(traces.position_labels) == 5 * 2 * (4 + 3 + 2 + 1)
    assert traces.position_features.shape == (len(traces.position_labels), len(POSITION_FEATURES))
    assert len(traces.block_labels) == 5 * 8  # every row at every step
    last_steps = traces.block_features[:, list(BLOCK_FEATURES).index("masked_fraction")] == 0.25
    assert bool(traces.block_labels[last_steps].all())  # one mask left: its argmax is what gets committed


def test_training_settings_are_checked():
    with pytest.raises(ValueError, match="`features` must name distinct features"):
        PolicyTrainingConfig(features=("confidence", "luck"))
    with pytest.raises(ValueError, match="`target_precision` must lie in"):
        PolicyTrainingConfig(target_precision=1.0)


# ---- llada-hf tune --learn ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_text_model(tmp_path_factory):
    return Path(save_tiny_text_model(tmp_path_factory.mktemp("policy-model")))


def test_cli_tune_learn_saves_a_policy_that_generate_loads(saved_text_model, tmp_path):
    from transformers import AutoModel

    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps({"prompt": f"the {w} sat on the", "completion": " mat"})
                             for w in ("cat", "dog", "bird", "cat", "dog", "bird")))
    command = [sys.executable, "-m", "llada_hf.cli", "tune", str(saved_text_model), "--dev", str(dev), "--learn",
               "--max-new-tokens", "8", "--block-length", "4", "--batch-size", "3", "--device", "cpu"]
    result = subprocess.run(command + ["--save"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "learned from" in result.stdout and "decoding_policy=learned" in result.stdout
    saved = json.loads((saved_text_model / "generation_config.json").read_text())
    assert saved["block_length"] == 4 and saved["decoding_policy"]["features"] == list(POSITION_FEATURES)
    model = AutoModel.from_pretrained(saved_text_model)
    assert model.generation_config.decoding_policy == saved["decoding_policy"]
    for extra, message in ((["--plot", str(tmp_path / "f.png")], "drop --trials and --plot"),
                           (["--target-precision", "1.5"], "`target_precision` must lie in")):
        result = subprocess.run(command + extra, capture_output=True, text=True, timeout=600)
        assert result.returncode == 1 and message in result.stderr, result.stderr
