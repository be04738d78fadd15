"""DiffusionSFTTrainer: the LLaDA loss by hand, noise rules, data formats, LoRA, resume, bad input, end to end."""

import json
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from sft_helpers import build_args, build_model, build_tokenizer, logged_losses, reversal_dataset, reversal_pairs
from trl import SFTConfig

from transformers import AutoModelForMaskedLM, LlamaConfig, LlamaForCausalLM

from llada_hf.tokenization import train_tokenizer
from llada_hf.trainers import (
    DataCollatorForMaskedDiffusion,
    DiffusionSFTConfig,
    DiffusionSFTTrainer,
    masked_diffusion_loss,
)


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: a second thread only adds synchronisation (measured 10-30x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(tmp_path, dataset=None, model=None, **arg_overrides) -> DiffusionSFTTrainer:
    return DiffusionSFTTrainer(
        model=model if model is not None else build_model(),
        args=build_args(tmp_path / "out", **arg_overrides),
        train_dataset=dataset if dataset is not None else reversal_dataset(32),
        processing_class=build_tokenizer(),
    )


def first_batch(trainer, n=4) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def spy_on_model_inputs(model) -> list[dict]:
    """Record the keyword arguments of every forward call (the trainer calls the model with keywords only), by a
    forward pre-hook: whatever `forward` the call runs (TRL's fused head while a loss is computed), the hook sees
    the call."""
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


# ---- configuration ----


def test_config_defaults_are_the_llada_recipe(tmp_path):
    args = DiffusionSFTConfig(output_dir=str(tmp_path), bf16=False)  # TRL's bf16 default needs a GPU or use_cpu
    assert args.time_epsilon == 1e-3
    assert args.loss_normalization == "answer_length"
    assert args.pad_answers_with_eos is True
    assert args.random_length_prob == 0.01
    assert args.noise_samples_per_example == 1
    assert args.antithetic_time is False


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("time_epsilon", 1.0, "time_epsilon"),
        ("loss_normalization", "mean", "loss_normalization"),
        ("noise_samples_per_example", 0, "noise_samples_per_example"),
        ("random_length_prob", 1.5, "random_length_prob"),
        ("padding_free", True, "padding_free"),
        ("packing", True, "packing_strategy"),  # TRL's default strategy "bfd" is padding-free
        ("assistant_only_loss", True, "assistant_only_loss"),
        ("loss_type", "dft", "loss_type"),
    ],
)
def test_config_rejects_bad_and_next_token_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSFTConfig(output_dir=str(tmp_path), bf16=False, **{field: value})


@pytest.mark.parametrize("sizes", [{"cp_size": 2}, {"sp_size": 2}])
def test_config_refuses_context_and_sequence_parallelism(tmp_path, sizes):
    from accelerate.parallelism_config import ParallelismConfig

    with pytest.raises(ValueError, match="data parallelism"):
        DiffusionSFTConfig(output_dir=str(tmp_path), bf16=False, parallelism_config=ParallelismConfig(**sizes))


def test_a_plain_sft_config_is_converted(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path / "out"), bf16=False, max_length=64, report_to="none", max_steps=1)
    trainer = DiffusionSFTTrainer(
        model=build_model(), args=args, train_dataset=reversal_dataset(8), processing_class=build_tokenizer()
    )
    assert isinstance(trainer.args, DiffusionSFTConfig) and trainer.args.max_length == 64
    assert trainer.args.time_epsilon == 1e-3  # the diffusion fields take their defaults


# ---- the loss, by hand ----


def test_loss_function_by_hand():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    masked = torch.tensor([[False, True, True, False], [True, False, False, False]])
    p = torch.tensor([0.5, 0.25])
    lengths = torch.tensor([3, 2])
    # row sums S = (2 + 3) / 0.5 = 10 and 5 / 0.25 = 20
    per_row = 10 / 3 + 20 / 2
    assert masked_diffusion_loss(nll, masked, p, lengths, "answer_length").item() == pytest.approx(per_row / 2)
    assert masked_diffusion_loss(nll, masked, p, lengths, "token").item() == pytest.approx(30 / 5)
    assert masked_diffusion_loss(nll, masked, p, lengths, "sequence").item() == pytest.approx(30 / 2)
    # part of a larger step: divided by the step's count instead
    assert masked_diffusion_loss(nll, masked, p, lengths, "answer_length", num_items=8).item() == pytest.approx(
        per_row / 8
    )


def test_trainer_loss_equals_llada_sft_loss_computed_by_hand(tmp_path):
    """LLADA.md section 5: sum over rows of sum over masked tokens of CE/p, / answer length (EOS padding
    included), / B."""
    pairs = reversal_pairs(2, length=2) + reversal_pairs(2, length=4)  # the short answers get EOS padding
    dataset = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    trainer = make_trainer(tmp_path, dataset=dataset)
    model = trainer.model
    batch = first_batch(trainer)
    seed = 1234
    loss = trainer.compute_loss(model, {**batch, "noise_seed": seed})

    # The same noise, drawn by hand from the same seed
    generator = torch.Generator().manual_seed(seed)
    ids, labels = batch["input_ids"], batch["labels"]
    t = torch.rand(len(ids), generator=generator)
    p = (1 - 1e-3) * t + 1e-3
    draws = torch.rand(ids.shape, generator=generator)
    answer = labels != -100
    masked = answer & (draws < p[:, None])
    noisy = ids.masked_fill(masked, trainer.mask_token_id)
    with torch.no_grad():
        logits = model(input_ids=noisy, attention_mask=batch["attention_mask"]).logits  # the plain forward
    expected = 0.0
    for row in range(len(ids)):
        row_sum = sum(
            F.cross_entropy(logits[row, pos], ids[row, pos]).item() / p[row].item()
            for pos in range(ids.shape[1])
            if masked[row, pos]
        )
        expected += row_sum / answer[row].sum().item()
    expected /= len(ids)
    assert masked.any() and (answer & ~masked).any()  # a non-trivial draw
    own_lengths = torch.tensor([len(trainer.train_dataset[i]["input_ids"]) for i in range(len(ids))])
    eos_padding = torch.arange(ids.shape[1])[None, :] >= own_lengths[:, None]
    assert (masked & eos_padding).any()  # the EOS padding is masked and scored like the answer
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- noise rules ----


def test_prompt_tokens_are_never_masked_and_answers_are(tmp_path):
    trainer = make_trainer(tmp_path, time_epsilon=0.5)  # p >= 0.5: most answer tokens get masked
    calls = spy_on_model_inputs(trainer.model)
    batch = first_batch(trainer, n=8)
    prompt = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    ever_masked = torch.zeros_like(prompt)
    for seed in range(20):
        trainer.compute_loss(trainer.model, {**batch, "noise_seed": seed})
        seen = calls[-1]["input_ids"]
        assert torch.equal(seen[prompt], batch["input_ids"][prompt])  # prompt intact
        ever_masked |= seen == trainer.mask_token_id
    assert prompt.any()
    assert torch.equal(ever_masked, batch["labels"] != -100)  # every answer position, and nothing else


def test_eos_padding_is_part_of_the_answer_and_scored(tmp_path):
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["reverse a b =", "reverse a b c d ="], "completion": [" b a", " d c b a"]})
    trainer = make_trainer(tmp_path, dataset=dataset)
    batch = first_batch(trainer, n=2)
    short = 0  # the first row is shorter: its answer is padded with EOS
    padded = batch["input_ids"][short] == tokenizer.eos_token_id
    own_length = len(trainer.train_dataset[short]["input_ids"])
    assert padded[own_length:].all() and own_length < batch["input_ids"].shape[1]
    assert (batch["attention_mask"][short, own_length:] == 1).all()  # attended
    assert (batch["labels"][short, own_length:] == tokenizer.eos_token_id).all()  # maskable and scored

    calls = spy_on_model_inputs(trainer.model)
    trainer.args.time_epsilon = 0.999  # p ~ 1: every answer token masked
    trainer.compute_loss(trainer.model, {**batch, "noise_seed": 0})
    targets = calls[-1]["shift_labels"]  # position-aligned targets handed to the LM head
    assert (targets[short, own_length:] == tokenizer.eos_token_id).all()

    # With `pad_answers_with_eos=False` the padding is neither attended nor scored
    plain = DataCollatorForMaskedDiffusion(tokenizer.pad_token_id, tokenizer.eos_token_id, pad_answers_with_eos=False)
    batch = plain([trainer.train_dataset[i] for i in range(2)])
    assert (batch["attention_mask"][short, own_length:] == 0).all()
    assert (batch["labels"][short, own_length:] == -100).all()


def test_text_dataset_is_pretraining_every_token_maskable(tmp_path):
    dataset = Dataset.from_dict({"text": ["the quick brown fox", "the lazy dog jumps over the quick brown fox"]})
    trainer = make_trainer(tmp_path, dataset=dataset)
    batch = first_batch(trainer, n=2)
    attended = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][attended], batch["input_ids"][attended])  # every token maskable
    assert (~attended).any() and (batch["labels"][~attended] == -100).all()  # padding ignored, not EOS-scored


def test_wrapped_packing_gives_full_length_pretraining_rows(tmp_path):
    text = Dataset.from_dict({"text": ["the quick brown fox", "the lazy dog jumps over the quick brown fox"] * 8})
    trainer = make_trainer(
        tmp_path, dataset=text, packing=True, packing_strategy="wrapped", max_length=16, max_steps=2
    )
    batch = first_batch(trainer, n=3)
    assert batch["input_ids"].shape == (3, 16) and (batch["labels"] != -100).all()  # no padding, all maskable
    assert trainer.train().global_step == 2


def test_streaming_conversational_dataset(tmp_path):
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}]
    stream = IterableDataset.from_generator(lambda: ({"messages": chat} for _ in range(16)))
    trainer = make_trainer(tmp_path, dataset=stream, max_steps=2)
    example = next(iter(trainer.train_dataset))
    assert -100 in example["labels"]  # split into prompt and completion: the prompt is not maskable
    assert trainer.train().global_step == 2


def test_random_length_cut_applies_to_pretraining_batches_only(tmp_path):
    text = Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog"] * 16})
    trainer = make_trainer(tmp_path, dataset=text, random_length_prob=1.0)
    full = first_batch(trainer, n=8)
    samples, count = trainer.get_batch_samples(iter([dict(full)] * 3), 3, torch.device("cpu"))
    lengths = [s["input_ids"].shape[1] for s in samples]
    assert all(1 <= n <= full["input_ids"].shape[1] for n in lengths) and min(lengths) < full["input_ids"].shape[1]
    assert count.item() == 3 * 8  # rows of the step ("answer_length" normalization)

    sft = make_trainer(tmp_path, random_length_prob=1.0)
    batch = first_batch(sft, n=8)
    samples, _ = sft.get_batch_samples(iter([dict(batch)]), 1, torch.device("cpu"))
    assert samples[0]["input_ids"].shape == batch["input_ids"].shape


def test_noise_samples_per_example_noise_each_example_several_times(tmp_path):
    trainer = make_trainer(tmp_path, noise_samples_per_example=3, loss_normalization="token")
    calls = spy_on_model_inputs(trainer.model)
    batch = first_batch(trainer, n=4)
    samples, count = trainer.get_batch_samples(iter([dict(batch)]), 1, torch.device("cpu"))
    assert count.item() == 3 * (batch["labels"] != -100).sum().item()
    loss = trainer.compute_loss(trainer.model, samples[0], num_items_in_batch=count)
    seen = calls[-1]["input_ids"]
    assert seen.shape[0] == 12 and torch.isfinite(loss)
    copies = seen.view(4, 3, -1)
    assert not torch.equal(copies[:, 0], copies[:, 1])  # each copy has its own noise


def test_multi_turn_conversation_trains_every_assistant_turn(tmp_path):
    tokenizer = build_tokenizer()
    chat = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "the quick fox"},
    ]
    trainer = make_trainer(tmp_path, dataset=Dataset.from_dict({"messages": [chat]}))
    assert len(trainer.train_dataset) == 2  # one example per assistant turn
    for example, turn in zip(trainer.train_dataset, (1, 3)):
        answer = [tok for tok, label in zip(example["input_ids"], example["labels"]) if label != -100]
        prompt = example["input_ids"][: len(example["input_ids"]) - len(answer)]
        assert tokenizer.decode(answer) == chat[turn]["content"] + "<|eot_id|>"
        rendered = tokenizer.apply_chat_template(chat[:turn], add_generation_prompt=True, tokenize=True)
        assert prompt == rendered["input_ids"]  # everything before the turn, earlier answers included


def test_evaluation_uses_the_same_noise_every_time(tmp_path):
    trainer = DiffusionSFTTrainer(
        model=build_model(),
        args=build_args(tmp_path / "out"),
        train_dataset=reversal_dataset(16),
        eval_dataset=reversal_dataset(16, seed=1),
        processing_class=build_tokenizer(),
    )
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"]
    assert {"eval_masked_token_accuracy", "eval_mean_t", "eval_answer_tokens"} <= set(first)


# ---- training: metrics, resume, LoRA, model by path ----


def test_training_logs_diffusion_metrics_and_resumes_with_the_same_loss_curve(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, seed=7)
    uninterrupted = make_trainer(tmp_path / "a", **common)
    uninterrupted.train()
    log = uninterrupted.state.log_history[0]
    assert {"loss", "masked_token_accuracy", "mean_t", "answer_tokens"} <= set(log)
    assert "entropy" not in log and "mean_token_accuracy" not in log  # TRL's next-token metrics are gone
    assert 0 < log["mean_t"] < 1 and log["answer_tokens"] > 0

    resumed = make_trainer(tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    # steps 1-2 come from the checkpoint's state, steps 3-4 are trained again after resuming
    assert logged_losses(resumed) == pytest.approx(logged_losses(uninterrupted), rel=1e-6)


def test_lora_all_linear_with_checkpointing_and_bf16_then_merge_and_load(tmp_path):
    model = build_model()
    base_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = DiffusionSFTTrainer(
        model=model,
        args=build_args(tmp_path / "out", gradient_checkpointing=True, bf16=True, use_cpu=True,
                        learning_rate=1e-2),
        train_dataset=reversal_dataset(32),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    peft_model = trainer.model
    wrapped = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    assert any(name.endswith("self_attn.q_proj") for name in wrapped)
    assert any(name.endswith("mlp.down_proj") for name in wrapped)
    assert not any("lm_head" in name for name in wrapped)  # "all-linear" leaves the LM head alone
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    trainer.train()

    for name, param in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(param, base_before[original]), name  # base weights untouched
    assert any(not torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if "lora_" in n)

    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[5, 6, 7, trainer.mask_token_id]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, merged(ids).logits, atol=1e-5)
    assert any(not torch.equal(merged.state_dict()[k], base_before[k]) for k in base_before)  # the adapter is in


def test_model_given_as_a_path(tmp_path):
    build_model().save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    trainer = DiffusionSFTTrainer(
        model=str(tmp_path / "model"),
        args=build_args(tmp_path / "out", max_steps=1),
        train_dataset=reversal_dataset(8),
    )
    assert trainer.train().global_step == 1


# ---- bad input: a clear error before training, nothing written ----


def _no_mask_tokenizer():
    tokenizer = train_tokenizer(["reverse a b c d = d c b a"] * 3, vocab_size=280)
    tokenizer.mask_token = None
    return tokenizer


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("unknown columns", ValueError, "none of the formats"),
        ("prompt fills max_length", ValueError, "no answer token"),
        ("no mask token anywhere", ValueError, "No mask token"),
        ("autoregressive model", TypeError, "masked diffusion"),
        ("autoregressive model path", TypeError, "masked diffusion"),
    ],
)
def test_bad_input_fails_before_training_and_writes_nothing(tmp_path, case, error, message):
    tokenizer, model, dataset, max_length = build_tokenizer(), build_model(), reversal_dataset(8), 64
    if case == "unknown columns":
        dataset = Dataset.from_dict({"question": ["a"], "answer": ["b"]})
    elif case == "prompt fills max_length":
        max_length = len(tokenizer("reverse a b c d =").input_ids)  # every prompt fills it
    elif case == "no mask token anywhere":
        tokenizer = _no_mask_tokenizer()
        model = build_model(tokenizer, mask_token_id=None)
    elif case == "autoregressive model":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2))
    elif case == "autoregressive model path":
        LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(tmp_path / "llama")
        model = str(tmp_path / "llama")
    with pytest.raises(error, match=message):
        DiffusionSFTTrainer(
            model=model,
            args=build_args(tmp_path / "out", max_length=max_length),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    assert not (tmp_path / "out").exists()


# ---- scale-out: two processes equal one process with gradient accumulation ----

TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests_dir!r})
    from sft_helpers import build_args, build_model, build_tokenizer, logged_losses, reversal_dataset
    from llada_hf.trainers import DiffusionSFTTrainer

    torch.set_num_threads(1)
    trainer = DiffusionSFTTrainer(
        model=build_model(),
        args=build_args(
            {output_dir!r}, per_device_train_batch_size=2, max_steps=3, antithetic_time=True, use_cpu=True
        ),
        train_dataset=reversal_dataset(24),
        processing_class=build_tokenizer(),
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open({result!r}, "w") as f:
            json.dump({{"processes": trainer.accelerator.num_processes, "losses": logged_losses(trainer)}}, f)
    """
)


def test_two_processes_give_the_loss_curve_of_gradient_accumulation(tmp_path):
    script, result = tmp_path / "train.py", tmp_path / "result.json"
    script.write_text(
        TWO_PROCESS_SCRIPT.format(tests_dir=TESTS_DIR, output_dir=str(tmp_path / "ddp"), result=str(result))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # accelerate's multi-process (torchrun) launcher; with `use_cpu=True` the processes join a gloo group
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    run = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    two_processes = json.loads(result.read_text())
    assert two_processes["processes"] == 2

    # Same examples per optimizer step (2 x 2 rows), same noise, one process accumulating 2 micro-batches
    one_process = make_trainer(
        tmp_path, dataset=reversal_dataset(24), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=3, antithetic_time=True,
    )
    one_process.train()
    expected = {str(step): loss for step, loss in logged_losses(one_process).items()}
    assert two_processes["losses"] == pytest.approx(expected, rel=1e-5)


# ---- variance of the loss estimate ----


class PairOracle(torch.nn.Module):
    """Stands in for a trained model on rows of letter pairs ("a a c c b b ..."): a masked letter is known exactly
    when its partner is visible, else it is a guess among 6. Its expected loss grows with t, as a trained diffusion
    model's does, so the measured variance shows what stratifying t removes (a real model's is of the same kind, but
    too noisy to measure in a unit test's budget). It answers the trainer's fused-head call."""

    def __init__(self, mask_token_id: int):
        super().__init__()
        self.mask_token_id = mask_token_id

    def forward(self, input_ids, shift_labels, **kwargs):
        partner = input_ids.view(len(input_ids), -1, 2).flip(-1).reshape(input_ids.shape)
        scored = shift_labels != -100
        known = (partner != self.mask_token_id) & scored
        return SimpleNamespace(log_probs=torch.where(known, 0.0, -math.log(6)) * scored, is_top1=known)


def test_antithetic_time_lowers_the_variance_of_the_loss_estimate(tmp_path):
    trainer = make_trainer(tmp_path, dataset=reversal_dataset(8))
    pairs = torch.randint(10, 16, (16, 32), generator=torch.Generator().manual_seed(0))
    ids = pairs.repeat_interleave(2, dim=1)  # 16 rows of 64 tokens, every token maskable (pretraining)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    oracle = PairOracle(trainer.mask_token_id)
    estimates = {}
    for antithetic in (False, True):
        trainer.args.antithetic_time = antithetic
        estimates[antithetic] = torch.stack(
            [trainer.compute_loss(oracle, {**batch, "noise_seed": seed}) for seed in range(1000)]
        )
    expected = math.log(6) * (1 + 1e-3) / 2  # E[p] ln 6: a letter is a guess when its partner is masked too
    for losses in estimates.values():
        assert losses.mean().item() == pytest.approx(expected, rel=0.05)  # both unbiased
    variance, antithetic_variance = estimates[False].var().item(), estimates[True].var().item()
    print(f"loss variance: independent t {variance:.4g}, antithetic t {antithetic_variance:.4g}")
    assert antithetic_variance < 0.5 * variance


# ---- end to end: train from scratch, generate, exact match ----


def test_trained_from_scratch_reaches_90_percent_exact_match_with_generate(tmp_path):
    """A tiny LLaDA trained from scratch on 4-letter reversal (about 12 s on one CPU core), then `generate`."""
    tokenizer = build_tokenizer()
    trainer = DiffusionSFTTrainer(
        model=build_model(tokenizer),
        args=build_args(
            tmp_path, max_steps=200, per_device_train_batch_size=32, learning_rate=3e-3, lr_scheduler_type="cosine",
            warmup_steps=20, weight_decay=0.0, logging_steps=50,
        ),
        train_dataset=reversal_dataset(1800),
        processing_class=tokenizer,
    )
    trainer.train()
    model = trainer.model.eval()

    held_out = reversal_pairs(100, seed=99)
    prompts = tokenizer([p for p, _ in held_out], return_tensors="pt", padding=True)
    answer_length = len(tokenizer(held_out[0][1]).input_ids) + 1  # the letters and an EOS
    with torch.no_grad():
        out = model.generate(
            prompts.input_ids, attention_mask=prompts.attention_mask, max_new_tokens=answer_length,
            steps=answer_length, block_length=answer_length, temperature=0.0,
        )
    answers = tokenizer.batch_decode(out[:, prompts.input_ids.shape[1]:], skip_special_tokens=True)
    exact = sum(a.strip() == c.strip() for a, (_, c) in zip(answers, held_out)) / len(held_out)
    print(f"exact match on held-out reversals: {exact:.2f}")
    assert exact >= 0.9


# ---- Hub integration: our card and the model's code go with every push ---------------------------------


class _RecordingApi:
    def __init__(self):
        self.uploads = []

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, folder_path)
                if not relative.startswith(("checkpoint-", "_")):
                    files[relative] = open(path, "rb").read()
        self.uploads.append((repo_id, files))


def test_push_to_hub_uploads_our_card_and_the_model_code(tmp_path, monkeypatch):
    import transformers.trainer

    from llada_hf import LladaConfig, LladaForMaskedDiffusion
    from llada_hf.tokenization import model_token_ids, train_tokenizer

    api = _RecordingApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    tokenizer = train_tokenizer(["2+2=4", "3+3=6"], vocab_size=270)
    config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         **model_token_ids(tokenizer))
    trainer = DiffusionSFTTrainer(
        model=LladaForMaskedDiffusion(config),
        args=DiffusionSFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                bf16=False, report_to="none", save_strategy="no", gradient_checkpointing=False),
        train_dataset=Dataset.from_dict({"prompt": ["2+2=", "3+3="], "completion": ["4", "6"]}),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.hub_model_id = "alice/tiny-llada"
    trainer.push_to_hub()
    (repo_id, files), = api.uploads
    assert repo_id == "alice/tiny-llada"
    for name in ("model.safetensors", "config.json", "configuration_llada.py", "modeling_llada.py",
                 "generation_llada.py", "tokenizer.json", "README.md"):
        assert name in files, name
    card = files["README.md"].decode()
    assert "masked-diffusion" in card and "custom_code" in card
    assert 'model_id = "alice/tiny-llada"' in card and "trust_remote_code=True" in card
    assert "Training" in card


def test_the_trained_model_is_a_plain_model_that_copies_cleanly(tmp_path):
    """TRL's fused LM head is on only while a loss is computed: after training the model has its own forward, so a
    deep copy trained further answers with its own weights (with the patch left on, the copy called the original's
    forward: its logits never moved)."""
    import copy

    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    model = trainer.model
    assert "forward" not in model.__dict__
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.add_(0.5)
        ids = torch.tensor([[5, 6, 7, 8]])
        assert not torch.equal(twin(ids).logits, model(ids).logits)
    trainer.train()  # and training again still works
