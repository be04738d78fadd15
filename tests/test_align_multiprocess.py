"""DiffusionDPOTrainer and DiffusionGRPOTrainer under `accelerate launch` with two CPU processes (gloo).

- DPO: two processes x 1 pair per step give the losses, reward metrics and final weights of one process that
  accumulates 2 micro-batches of 1 pair. The trainer seeds each process's ELBO noise with its rank, so the test keys
  the noise on the rows instead (the same pair gets the same masks in both runs); everything else is the trainer's.
- GRPO: with `num_generations=2` and one completion per process, a group spans both processes (TRL's rule: the
  global generation batch, not the per-device one, must be a multiple of `num_generations`). Both processes get the
  same prompt, and the advantages are computed from the rewards gathered across processes.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from helpers import tokenizer_model
from sft_helpers import build_tokenizer, reversal_pairs

from llada_hf.trainers import DiffusionDPOConfig, DiffusionDPOTrainer
from llada_hf.trainers.elbo import draw_elbo_noise


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
STEPS = 3


def launch(script_text: str, tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(script_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # accelerate's multi-process (torchrun) launcher; with `use_cpu=True` the processes join a gloo group
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]  # the failing rank reports on stdout


# ---- DPO: two processes equal one process with gradient accumulation ----


class RowKeyedNoiseDPOTrainer(DiffusionDPOTrainer):
    """Draws each batch's ELBO noise from a generator seeded by the batch's tokens, so that a pair gets the same
    masks whichever process, micro-batch or step scores it."""

    def _draw_noise(self, batch):
        generator = torch.Generator().manual_seed(hash(tuple(batch.input_ids.flatten().tolist())) % 2**62)
        return draw_elbo_noise(batch.answer_lengths.cpu(), self.args.n_time, self.args.n_mask, generator)


def preference_dataset(n: int = 8) -> Dataset:
    pairs = reversal_pairs(n, length=3, seed=5)
    return Dataset.from_dict(
        {
            "prompt": [p for p, _ in pairs],
            "chosen": [c for _, c in pairs],
            "rejected": [" " + " ".join(sorted(c.split())) for _, c in pairs],
        }
    )


def build_dpo_trainer(output_dir, **overrides) -> DiffusionDPOTrainer:
    tokenizer = build_tokenizer()
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=1, max_steps=STEPS, learning_rate=1e-2, n_time=2,
        bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, max_length=64, beta=0.5,
    )
    kwargs.update(overrides)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    return RowKeyedNoiseDPOTrainer(
        model=tokenizer_model(tokenizer, seed=0, **sizes),
        ref_model=tokenizer_model(tokenizer, seed=1, **sizes),
        args=DiffusionDPOConfig(**kwargs),
        train_dataset=preference_dataset(),
        processing_class=tokenizer,
    )


def dpo_logs(trainer) -> dict[str, dict[str, float]]:
    """Per step: the training loss and TRL's reward metrics (over all processes)."""
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")
    return {
        str(entry["step"]): {key: entry[key] for key in keys}
        for entry in trainer.state.log_history
        if "loss" in entry
    }


DPO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests_dir!r})
    from test_align_multiprocess import build_dpo_trainer, dpo_logs

    torch.set_num_threads(1)
    trainer = build_dpo_trainer({output_dir!r}, use_cpu=True)
    trainer.train()
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({{name: p.detach().clone() for name, p in model.named_parameters()}}, {weights!r}.format(rank=rank))
    if trainer.accelerator.is_main_process:
        with open({result!r}, "w") as f:
            json.dump({{"processes": trainer.accelerator.num_processes, "logs": dpo_logs(trainer),
                        "global_step": trainer.state.global_step}}, f)
    """
)


def test_dpo_two_processes_equal_one_process_with_gradient_accumulation(tmp_path):
    result, weights = tmp_path / "result.json", str(tmp_path / "weights{rank}.pt")
    launch(
        DPO_SCRIPT.format(tests_dir=TESTS_DIR, output_dir=str(tmp_path / "ddp"), result=str(result), weights=weights),
        tmp_path,
    )
    two_processes = json.loads(result.read_text())
    assert two_processes["processes"] == 2
    assert two_processes["global_step"] == STEPS
    assert list(two_processes["logs"]) == [str(step) for step in range(1, STEPS + 1)]

    # Same pairs per optimizer step (2 x 1), same masks per pair, one process accumulating 2 micro-batches
    one_process = build_dpo_trainer(tmp_path / "single", gradient_accumulation_steps=2)
    one_process.train()
    expected = dpo_logs(one_process)
    for step, logs in expected.items():
        assert two_processes["logs"][step] == pytest.approx(logs, rel=1e-5, abs=1e-6), step
    assert len({logs["loss"] for logs in expected.values()}) == STEPS  # the weights moved: a real comparison

    rank0, rank1 = (torch.load(weights.format(rank=rank)) for rank in (0, 1))
    for name, parameter in one_process.model.named_parameters():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # DDP keeps the replicas identical
        torch.testing.assert_close(rank0[name], parameter.detach(), rtol=1e-4, atol=1e-6)


# ---- GRPO: a group spans both processes; rewards are gathered before the advantages ----


GRPO_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from llada_hf.trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    record = {{"rewards": [], "prompts": [], "advantages": [], "completion_ids": []}}

    def rank_reward(prompts, completions, **kwargs):
        # the same completion is worth 0 on process 0 and 1 on process 1: only gathered rewards give advantages
        record["prompts"].append(list(prompts))
        record["rewards"].append([float(rank)] * len(completions))
        return [float(rank)] * len(completions)

    class Recording(DiffusionGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            record["advantages"].append(output["advantages"].tolist())
            record["completion_ids"].append(output["completion_ids"].tolist())
            return output

    trainer = Recording(
        model={model!r},
        reward_funcs=rank_reward,
        args=DiffusionGRPOConfig(
            output_dir={output_dir!r}, per_device_train_batch_size=1, num_generations=2, max_steps=4,
            num_iterations=2, max_completion_length=4, diffusion_steps=4, block_length=4, learning_rate=1e-3,
            beta=0.04, bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1,
            save_strategy="no", disable_tqdm=True, use_cpu=True,
        ),
        train_dataset=Dataset.from_dict({{"prompt": ["reverse a b =", "reverse c d =", "reverse e f ="]}}),
        processing_class=AutoTokenizer.from_pretrained({model!r}),
    )
    trainer.train()
    record["processes"] = trainer.accelerator.num_processes
    record["global_step"] = trainer.state.global_step
    record["logs"] = [entry for entry in trainer.state.log_history if "reward" in entry]
    with open({result!r}.format(rank=rank), "w") as f:
        json.dump(record, f)
    """
)


def test_grpo_groups_span_processes_and_rewards_are_gathered(tmp_path):
    tokenizer = build_tokenizer()
    model = str(tmp_path / "base")  # beta > 0: TRL loads the reference model from the model's path
    tokenizer_model(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1).save_pretrained(model)
    tokenizer.save_pretrained(model)
    result = str(tmp_path / "result{rank}.json")
    launch(GRPO_SCRIPT.format(model=model, output_dir=str(tmp_path / "ddp"), result=result), tmp_path)
    ranks = [json.loads(open(result.format(rank=rank)).read()) for rank in (0, 1)]

    for record in ranks:
        assert record["processes"] == 2
        assert record["global_step"] == 4
        assert len(record["advantages"]) == 2  # 4 steps, num_iterations=2: two rollouts
        for completion in record["completion_ids"]:  # one diffusion rollout of max_completion_length per process
            assert len(completion) == 1 and 1 <= len(completion[0]) <= 4
        # logged at each rollout: the mean reward over both processes' completions
        assert [entry["reward"] for entry in record["logs"]] == pytest.approx([0.5, 0.5])
    # each rollout's group of 2 is one prompt, split over the processes
    assert ranks[0]["prompts"] == ranks[1]["prompts"]
    assert [len(prompts) for prompts in ranks[0]["prompts"]] == [1, 1]
    # scale_rewards="none": advantage = reward - group mean, from the rewards of both processes
    for rank, advantage in ((0, -0.5), (1, 0.5)):
        torch.testing.assert_close(torch.tensor(ranks[rank]["advantages"]), torch.full((2, 1), advantage))
