"""DiffusionDPOTrainer (VRPO): unbiased ELBO-based preference scores, the variance reductions, no next-token path,
LoRA as the reference, the Hub card and bad inputs."""

import ast
import copy
import math
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import MASK_ID, tokenizer_model
from llada_reference import exact_expected_estimate, model_logits_fn
from trl import DPOTrainer

from llada_hf.elbo import official_mask_counts
from llada_hf.trainers import DiffusionDPOConfig, DiffusionDPOTrainer
from llada_hf.trainers import elbo as training_elbo
from llada_hf.trainers.elbo import AnswerBatch, draw_elbo_noise, elbo_estimates, right_align, stratified_mask_counts


# Short answers (2-3 tokens with the EOS TRL appends), so that every mask pattern can be enumerated.
PAIRS = {"prompt": ["reverse a b =", "reverse c d e ="], "chosen": [" b a", " e d c"], "rejected": [" a", " c d"]}


def make_args(tmp_path, **overrides) -> DiffusionDPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        n_time=4,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=64,
    )
    kwargs.update(overrides)
    return DiffusionDPOConfig(**kwargs)


def make_trainer(tmp_path, tokenizer, policy_seed=0, ref_seed=0, **overrides) -> DiffusionDPOTrainer:
    model = tokenizer_model(tokenizer, seed=policy_seed, hidden_size=64, intermediate_size=128)
    ref_model = tokenizer_model(tokenizer, seed=ref_seed, hidden_size=64, intermediate_size=128)
    return DiffusionDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=make_args(tmp_path, **overrides),
        train_dataset=Dataset.from_dict(PAIRS),
        processing_class=tokenizer,
    )


def collated(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def exact_elbo(model, mask_id, prompt_ids, answer_ids) -> float:
    # One row per group: the mask count is uniform on 1..L, so the enumerated expectation is the ELBO itself.
    return exact_expected_estimate(model_logits_fn(model), mask_id, prompt_ids, answer_ids, [1])


def repeated_estimates(model, batch, trainer, copies, generator, noise=None):
    """`copies` independent ELBO estimates of every row of `batch` (rows repeated), shape [copies, R]."""
    rows = len(batch.input_ids)
    big = type(batch)(*(t.repeat(copies, 1) for t in (batch.input_ids, batch.attention_mask, batch.answer_slots)))
    if noise is None:
        noise = draw_elbo_noise(big.answer_lengths, trainer.args.n_time, trainer.args.n_mask, generator)
    with torch.no_grad():
        return elbo_estimates(model, big, noise, trainer.mask_token_id).view(copies, rows).double(), noise


def test_mask_counts_are_stratified_and_exactly_uniform():
    for length in range(1, 12):
        for n_time in (1, 2, 3, 4, 8, 16):
            base = official_mask_counts(length, n_time, 1)
            by_shift = [((base - 1 + shift) % length + 1).tolist() for shift in range(length)]  # L x [n_time]
            # A draw is the official spread shifted by a uniform amount ...
            for seed in range(5):
                assert stratified_mask_counts(length, n_time, torch.Generator().manual_seed(seed)).tolist() in by_shift
            # ... so over the shifts, every row takes every count in 1..L exactly once: each row is uniform
            for row in range(n_time):
                assert sorted(counts[row] for counts in by_shift) == list(range(1, length + 1))


def test_elbo_estimates_and_the_preference_score_are_unbiased(tmp_path, text_tokenizer):
    trainer = make_trainer(tmp_path, text_tokenizer, policy_seed=0, ref_seed=1)
    policy, reference = trainer.model.eval(), trainer.ref_model.eval()
    inputs = collated(trainer)
    batch = right_align(inputs)
    generator = torch.Generator().manual_seed(0)
    copies = 150
    policy_estimates, noise = repeated_estimates(policy, batch, trainer, copies, generator)
    ref_estimates, _ = repeated_estimates(reference, batch, trainer, copies, generator, noise=noise)  # antithetic

    mask_id = trainer.mask_token_id
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS["prompt"]))]
    answers = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + [
        (e["prompt_ids"], e["rejected_ids"]) for e in examples
    ]
    exact = {
        name: torch.tensor([exact_elbo(model, mask_id, p, a) for p, a in answers], dtype=torch.float64)
        for name, model in (("policy", policy), ("reference", reference))
    }
    for name, estimates in (("policy", policy_estimates), ("reference", ref_estimates)):
        stderr = estimates.std(dim=0) / math.sqrt(copies)
        assert (stderr < 0.02 * exact[name].abs()).all()  # the check below is a sharp one
        assert ((estimates.mean(dim=0) - exact[name]).abs() < 4 * stderr).all(), (name, estimates.mean(0), exact[name])

    # The preference score inside the DPO loss: (log-ratio of chosen) - (log-ratio of rejected)
    def score(values):  # [..., 2B] -> [..., B]
        chosen, rejected = values.chunk(2, dim=-1)
        return chosen - rejected

    estimated = score(policy_estimates - ref_estimates)
    exact_score = score(exact["policy"] - exact["reference"])
    stderr = estimated.std(dim=0) / math.sqrt(copies)
    assert ((estimated.mean(dim=0) - exact_score).abs() < 4 * stderr).all(), (estimated.mean(0), exact_score)
    assert (exact_score.abs() > 8 * stderr).all()  # the score is far from 0: the check above is not vacuous


def _loss_and_gradient(trainer, inputs, seed):
    trainer._noise_generators["train"].manual_seed(seed)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.item(), gradient


def test_antithetic_sampling_lowers_the_variance_of_the_loss(tmp_path, text_tokenizer):
    trainer = make_trainer(tmp_path, text_tokenizer)
    with torch.no_grad():  # a policy a few steps away from its reference
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * parameter.std() * torch.randn_like(parameter))
    trainer.model.train()
    inputs = collated(trainer)

    spread = {}
    for antithetic in (True, False):
        trainer.args.antithetic_sampling = antithetic
        draws = [_loss_and_gradient(trainer, inputs, seed) for seed in range(24)]
        losses = torch.tensor([loss for loss, _ in draws], dtype=torch.float64)
        gradients = torch.stack([gradient for _, gradient in draws]).double()
        spread[antithetic] = (losses.var().item(), gradients.var(dim=0).sum().item())
    loss_ratio = spread[False][0] / spread[True][0]
    gradient_ratio = spread[False][1] / spread[True][1]
    print(f"antithetic sampling: loss variance / {loss_ratio:.1f}, gradient variance / {gradient_ratio:.2f}")
    assert loss_ratio > 20, spread
    # The gradient flows through the policy's ELBO only; the shared noise cancels in the loss's weight
    # sigmoid(-beta * score), which is why the gradient's spread falls much less (here not at all)
    assert gradient_ratio > 0.95, spread


@pytest.mark.parametrize("answer, margin", [([9, 10, 11], 3.0), ([20, 21, 22, 23, 24, 25], 1.2)])
def test_optimal_allocation_lowers_the_variance_of_the_elbo(tiny_llada, answer, margin):
    # The same budget of 8 rows: 8 timesteps x 1 mask (VRPO's optimal allocation) against 1 timestep x 8 masks
    copies, ids = 200, torch.tensor([[5, 6, 7, 8] + answer])
    batch = AnswerBatch(
        ids.repeat(copies, 1),
        torch.ones_like(ids).repeat(copies, 1),
        torch.ones(copies, len(answer), dtype=torch.bool),
    )
    variance = {}
    for n_time, n_mask in ((8, 1), (1, 8)):
        noise = draw_elbo_noise(batch.answer_lengths, n_time, n_mask, torch.Generator().manual_seed(0))
        with torch.no_grad():
            variance[n_time] = elbo_estimates(tiny_llada, batch, noise, MASK_ID).double().var().item()
    print(f"optimal allocation, {len(answer)}-token answer: ELBO variance / {variance[1] / variance[8]:.1f}")
    assert variance[1] > margin * variance[8], variance


def test_training_imports_nothing_from_the_evaluation():
    # The ELBO pieces both estimators use live in the neutral `llada_hf.elbo`: training never loads the evaluation
    def evaluation_imports(path: Path) -> list[str]:
        found = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {module}" for module in modules if "evaluation" in module.split(".")]
        return found

    trainers = Path(training_elbo.__file__).parent
    assert [found for path in sorted(trainers.glob("*.py")) for found in evaluation_imports(path)] == []


def test_training_never_takes_a_next_token_path(tmp_path, text_tokenizer):
    trainer = make_trainer(tmp_path, text_tokenizer)
    assert DiffusionDPOTrainer.compute_ref_log_probs is not DPOTrainer.compute_ref_log_probs
    assert DiffusionDPOTrainer.compute_loss is not DPOTrainer.compute_loss
    for model in (trainer.model, trainer.ref_model):  # TRL's fused (shifted) LM head is undone
        assert "forward" not in vars(model)
    calls = []

    def record(module, args, kwargs):
        calls.append(kwargs)

    handles = [
        model.register_forward_pre_hook(record, with_kwargs=True) for model in (trainer.model, trainer.ref_model)
    ]
    try:
        trainer.train()
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2 * trainer.args.max_steps  # one policy and one reference pass per step
    mask_id = trainer.mask_token_id
    for kwargs in calls:
        assert not {"labels", "shift_labels", "fused_lm_head"} & set(kwargs)
        assert kwargs["logits_to_keep"] > 0 and (kwargs["input_ids"] == mask_id).any()
        assert len(kwargs["input_ids"]) == 2 * 2 * trainer.args.sampling_budget  # pairs x 2 answers x budget
    assert trainer.state.log_history[0]["rewards/margins"] == 0.0  # policy = reference, same masks: exactly 0


def test_lora_uses_the_disabled_adapter_as_reference(tmp_path, text_tokenizer):
    from peft import LoraConfig

    model = tokenizer_model(text_tokenizer, hidden_size=64, intermediate_size=128)
    trainer = DiffusionDPOTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=3),
        train_dataset=Dataset.from_dict(PAIRS),
        processing_class=text_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert history[0]["rewards/margins"] == 0.0  # a fresh adapter is the identity: the reference itself
    assert history[-1]["rewards/margins"] != 0.0


def test_precomputed_reference_needs_independent_noise(tmp_path, text_tokenizer):
    with pytest.raises(ValueError, match="antithetic_sampling=False"):
        make_args(tmp_path, precompute_ref_log_probs=True)
    trainer = make_trainer(tmp_path, text_tokenizer, precompute_ref_log_probs=True, antithetic_sampling=False)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    assert trainer.train().global_step == 2


def test_push_to_hub_carries_the_card_with_the_method(tmp_path, monkeypatch, text_tokenizer):
    import transformers.trainer

    uploads = []

    class RecordingApi:
        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append(
                (repo_id, set(os.listdir(folder_path)), open(os.path.join(folder_path, "README.md")).read())
            )

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: RecordingApi())
    trainer = make_trainer(tmp_path, text_tokenizer, max_steps=1)
    trainer.train()
    trainer.hub_model_id = "alice/tiny-llada-dpo"
    trainer.push_to_hub()
    ((repo_id, files, card),) = uploads
    assert repo_id == "alice/tiny-llada-dpo"
    assert {"model.safetensors", "modeling_llada.py", "generation_llada.py", "README.md"} <= files
    assert "DiffusionDPOTrainer" in card and "VRPO" in card and "n = 4 timesteps x 1 mask" in card
    assert "antithetic sampling on" in card and 'model_id = "alice/tiny-llada-dpo"' in card


# ---- Bad input -------------------------------------------------------------------------------------------


def test_a_causal_lm_is_refused(tmp_path, text_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(text_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(TypeError, match=r"DiffusionDPOTrainer trains masked diffusion.*trl\.DPOTrainer"):
        DiffusionDPOTrainer(
            model=llama,
            args=make_args(tmp_path),
            train_dataset=Dataset.from_dict(PAIRS),
            processing_class=text_tokenizer,
        )


@pytest.mark.parametrize("column", ["chosen", "rejected"])
def test_empty_answers_are_refused(tmp_path, text_tokenizer, column):
    rows = {key: list(values) for key, values in PAIRS.items()}
    rows[column][1] = "  "
    model = tokenizer_model(text_tokenizer)
    with pytest.raises(ValueError, match=f"Row 1 of the train dataset has an empty `{column}` answer"):
        DiffusionDPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=make_args(tmp_path),
            train_dataset=Dataset.from_dict(rows),
            processing_class=text_tokenizer,
        )


@pytest.mark.parametrize("field", ["n_time", "n_mask"])
def test_budgets_of_zero_are_refused(tmp_path, field):
    with pytest.raises(ValueError, match=f"`{field}` must be an integer >= 1"):
        make_args(tmp_path, **{field: 0})


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"loss_type": ["sigmoid", "bco_pair"]}, "loss_type=\\['bco_pair'\\]"),
        ({"use_weighting": True}, "next-token probabilities"),
        ({"f_divergence_type": "js_divergence"}, "reverse_kl"),
    ],
)
def test_next_token_options_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)
