"""DiffusionGRPOTrainer (diffu-GRPO, d1): diffusion rollouts, the one-step log-probability estimate and its masks, no
next-token path, LoRA, the Hub card and bad inputs."""

import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import tokenizer_model
from trl import GRPOTrainer

from llada_hf.generation_llada import DiffusionGenerationConfig
from llada_hf.trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer
from llada_hf.trainers.grpo import one_step_prompt_masks


PROMPTS = Dataset.from_dict({"prompt": ["reverse a b =", "reverse c d ="]})


def letter_count(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def spread_reward(completions, **kwargs):
    """Differs within every group whatever was sampled (an untrained model's samples may coincide), so that
    advantages are never all 0 and an update must move the policy."""
    return [float(index) for index in range(len(completions))]


def make_args(tmp_path, **overrides) -> DiffusionGRPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_steps=2,
        num_iterations=2,
        max_completion_length=4,
        diffusion_steps=4,
        block_length=4,
        learning_rate=1e-3,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return DiffusionGRPOConfig(**kwargs)


@pytest.fixture
def saved_model(tmp_path, text_tokenizer):
    """A tiny model saved with its tokenizer: with beta > 0 TRL loads the reference model from the model's path."""
    folder = str(tmp_path / "base")
    tokenizer_model(text_tokenizer, hidden_size=64, intermediate_size=128).save_pretrained(folder)
    text_tokenizer.save_pretrained(folder)
    return folder


def make_trainer(tmp_path, model, tokenizer, reward=letter_count, **overrides) -> DiffusionGRPOTrainer:
    return DiffusionGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=make_args(tmp_path, **overrides),
        train_dataset=PROMPTS,
        processing_class=tokenizer,
    )


def test_defaults_are_the_d1_recipe(tmp_path):
    args = DiffusionGRPOConfig(output_dir=str(tmp_path), bf16=False)
    assert (args.num_iterations, args.epsilon, args.beta, args.num_generations, args.temperature) == (
        12,
        0.5,
        0.04,
        6,
        0.9,
    )
    assert (args.max_completion_length, args.diffusion_steps, args.block_length, args.remasking) == (
        256,
        128,
        32,
        "low_confidence",
    )
    assert (args.p_mask_prompt, args.learning_rate, args.loss_type, args.scale_rewards) == (0.15, 3e-6, "bnpo", "none")
    assert args.use_bias_correction_kl is False


def test_prompt_masks_follow_the_seed_and_the_iteration():
    prompt_mask = torch.ones(3, 2000, dtype=torch.long)
    prompt_mask[0, :500] = 0  # left padding is never masked
    seeds = torch.tensor([11, 12, 13])
    first = one_step_prompt_masks(seeds, 0, prompt_mask, 0.15)
    assert torch.equal(first, one_step_prompt_masks(seeds, 0, prompt_mask, 0.15))  # same seed, same masks
    assert torch.equal(first[1:], one_step_prompt_masks(seeds[1:], 0, prompt_mask[1:], 0.15))  # whatever the batch
    assert not torch.equal(first, one_step_prompt_masks(seeds, 1, prompt_mask, 0.15))  # fresh per iteration
    assert not first[0, :500].any()
    assert abs(first[1:].float().mean().item() - 0.15) < 0.02
    assert not one_step_prompt_masks(seeds, 0, prompt_mask, 0.0).any()


def test_one_step_estimate_masks_the_whole_completion(tmp_path, text_tokenizer, text_model):
    trainer = make_trainer(tmp_path, text_model, text_tokenizer, beta=0.0, p_mask_prompt=0.3)
    model, mask_id = trainer.model.eval(), trainer.mask_token_id
    prompt = torch.tensor(
        [[0] + text_tokenizer("reverse a b =").input_ids, text_tokenizer("reverse c d e =").input_ids]
    )
    prompt_mask = (torch.arange(prompt.shape[1]) >= torch.tensor([[1], [0]])).long()
    completion = torch.tensor([text_tokenizer(" b a").input_ids + [1], text_tokenizer(" e d").input_ids + [1]])
    seeds = torch.tensor([3, 4])
    rollout = {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
               "completion_mask": torch.ones_like(completion)}
    with torch.no_grad():
        logps = trainer._per_iteration_logps(model, rollout, seeds, [0, 1])
    assert logps.shape == (2, 2, completion.shape[1])
    for iteration in (0, 1):  # by hand: prompt masked by the iteration's draw, then max_completion_length masks
        masked = one_step_prompt_masks(seeds, iteration, prompt_mask, 0.3)
        noisy = torch.cat([prompt.masked_fill(masked, mask_id), torch.full((2, 4), mask_id)], 1)
        with torch.no_grad():
            logits = model(
                noisy, attention_mask=torch.cat([prompt_mask, torch.ones(2, 4, dtype=torch.long)], 1)
            ).logits
        completion_logits = logits[:, prompt.shape[1] : prompt.shape[1] + completion.shape[1]]
        expected = F.log_softmax(completion_logits, -1).gather(-1, completion[..., None])[..., 0]
        torch.testing.assert_close(logps[:, iteration], expected)
    assert not torch.allclose(logps[:, 0], logps[:, 1])  # the two iterations saw different prompt masks


def test_training_uses_diffusion_rollouts_and_shares_masks_within_an_iteration(tmp_path, saved_model, text_tokenizer):
    trainer = make_trainer(tmp_path, saved_model, text_tokenizer, reward=spread_reward, max_steps=4, beta=0.04)
    assert (
        DiffusionGRPOTrainer._get_per_token_logps_and_entropies is not GRPOTrainer._get_per_token_logps_and_entropies
    )
    for model in (trainer.model, trainer.ref_model):  # TRL's fused (shifted) LM head is undone
        assert "forward" not in vars(model)
    config = trainer.generation_config
    assert isinstance(config, DiffusionGenerationConfig)
    assert (config.steps, config.block_length, config.max_new_tokens, config.temperature, config.do_sample) == (
        4,
        4,
        4,
        0.9,
        True,
    )

    generate_calls, forward_calls, ratios = [], [], []
    original_generate = trainer.model.generate

    def generate(*args, **kwargs):
        generate_calls.append(kwargs)
        return original_generate(*args, **kwargs)

    def record(module, args, kwargs):
        if not any(frame.function == "generate" for frame in inspect.stack()):  # scoring, not denoising
            forward_calls.append(kwargs)

    trainer.model.generate = generate
    handle = trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    original_loss = trainer._compute_loss

    def compute_loss(model, inputs):  # the current policy's log-probabilities against the old ones
        current, _, _ = trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].shape[1],
        )
        ratios.append((current.detach() - inputs["old_per_token_logps"]).abs().max().item())
        return original_loss(model, inputs)

    trainer._compute_loss = compute_loss
    try:
        trainer.train()
    finally:
        handle.remove()
    assert len(generate_calls) == 2  # one rollout per num_iterations (2) steps
    assert all(call["generation_config"] is config for call in generate_calls)
    assert ratios[0] == 0.0  # first update on a rollout: old policy = current policy on the same masks
    assert ratios[1] > 0.0  # after one update
    assert trainer.state.log_history[0]["kl"] == 0.0  # reference = policy on the same masks at the start
    mask_id = trainer.mask_token_id
    assert not any({"labels", "shift_labels", "fused_lm_head"} & set(kwargs) for kwargs in forward_calls)
    assert len(forward_calls) >= 2 * 4  # the old, reference and current policies, per iteration
    for kwargs in forward_calls:
        assert (kwargs["input_ids"][:, -4:] == mask_id).all()  # the whole completion is masked


def test_lora_trains_with_the_disabled_adapter_as_reference(tmp_path, text_tokenizer, text_model):
    from peft import LoraConfig

    trainer = DiffusionGRPOTrainer(
        model=text_model,
        reward_funcs=letter_count,
        args=make_args(tmp_path),
        train_dataset=PROMPTS,
        processing_class=text_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    assert trainer.train().global_step == 2
    assert trainer.state.log_history[0]["kl"] == 0.0


def test_push_to_hub_carries_the_card_with_the_method(tmp_path, monkeypatch, text_tokenizer, text_model):
    import transformers.trainer

    uploads = []

    class RecordingApi:
        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append(
                (repo_id, set(os.listdir(folder_path)), open(os.path.join(folder_path, "README.md")).read())
            )

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: RecordingApi())
    trainer = make_trainer(tmp_path, text_model, text_tokenizer, beta=0.0, max_steps=1)
    trainer.train()
    trainer.hub_model_id = "alice/tiny-llada-grpo"
    trainer.push_to_hub()
    ((repo_id, files, card),) = uploads
    assert {"model.safetensors", "modeling_llada.py", "generation_llada.py", "README.md"} <= files
    assert "DiffusionGRPOTrainer" in card and "diffu-GRPO" in card and "p_mask_prompt = 0.15" in card
    assert "`letter_count`" in card and "4 diffusion steps" in card


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
    with pytest.raises(TypeError, match=r"DiffusionGRPOTrainer trains masked diffusion.*trl\.GRPOTrainer"):
        make_trainer(tmp_path, llama, text_tokenizer, beta=0.0)


def test_an_in_memory_model_needs_a_path_for_its_reference(tmp_path, text_tokenizer, text_model):
    with pytest.raises(ValueError, match="save_pretrained"):
        make_trainer(tmp_path, text_model, text_tokenizer, beta=0.04)


def _raises(completions, **kwargs):
    raise KeyError("answer")


def _nan(completions, **kwargs):
    return [math.nan] * len(completions)


async def _async_inf(completions, **kwargs):
    return [math.inf] * len(completions)


@pytest.mark.parametrize(
    "reward, error, match",
    [
        (_raises, RuntimeError, "reward function '_raises' raised KeyError"),
        (_nan, ValueError, "reward function '_nan' returned nan"),
        (_async_inf, ValueError, "reward function '_async_inf' returned inf"),
    ],
)
def test_reward_functions_that_fail_are_named(tmp_path, text_tokenizer, text_model, reward, error, match):
    trainer = make_trainer(tmp_path, text_model, text_tokenizer, reward=reward, beta=0.0)
    with pytest.raises(error, match=match):
        trainer.train()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"p_mask_prompt": 1.0}, "p_mask_prompt"),
        ({"diffusion_steps": 0}, "diffusion_steps"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"cache_implementation": "static"}, "kv_cache"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)
