"""Reinforcement learning of masked diffusion models with TRL: `DiffusionGRPOConfig` and `DiffusionGRPOTrainer`
(diffu-GRPO, from d1: Zhao et al., "d1: Scaling Reasoning in Diffusion Large Language Models via Reinforcement
Learning", arXiv:2504.12216; code github.com/dllm-reasoning/d1, `diffu-grpo/`).

GRPO needs per-token log-probabilities of a completion under the current, the old (rollout-time) and the reference
policy. A masked diffusion model has no left-to-right factorisation; d1 estimates them in one forward pass: the
completion is fully masked, each prompt token is masked with probability `p_mask_prompt`, and log pi(o_k | q') is
read at every completion position k. The random prompt mask acts as a regulariser across the `num_iterations`
(mu) policy updates made on one batch of rollouts: within an iteration the old, reference and current policy see the
same masked prompt; every iteration draws a fresh one.

What is kept from TRL's `GRPOTrainer`: reward functions (callables, async callables or reward models, with
`reward_weights`), `num_generations` completions per prompt, group-relative advantages, the clipped-ratio losses
(`loss_type`), the KL penalty to the reference (`beta`; the PEFT model with its adapter disabled when training LoRA),
`num_iterations` with buffered rollouts, `steps_per_generation`, metrics and completion logging, checkpointing and
`accelerate`.

What changes, because TRL assumes a causal LM:

- Rollouts come from the diffusion `generate`: TRL's generation config (`max_completion_length`, `temperature`,
  `top_p`, `top_k`, `min_p`, `do_sample=True`) is turned into a `DiffusionGenerationConfig` with `diffusion_steps`,
  `block_length` and `remasking`; `generation_kwargs` may set any other diffusion option (e.g. `kv_cache`).
  `repetition_penalty` other than 1 and `cache_implementation` have no diffusion meaning and are refused by the
  config; vLLM and transformers' continuous batching serve causal LMs only and are refused too. A completion ends at
  its first EOS or end-of-turn token.
- Per-token log-probabilities are d1's one-step estimate (above), computed for every iteration of a rollout at
  rollout time (old and reference) and per iteration for the current policy; TRL's fused, shifted LM head is undone
  and never called. As in d1, the logits are not divided by the sampling temperature.
- The d1 recipe's values are the defaults (see `DiffusionGRPOConfig`).
"""

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from ..generation_llada import DiffusionGenerationConfig
from ..streaming_llada import end_token_ids
from .common import (
    adopt_mask_token,
    as_config,
    check_number,
    checked_model_and_processor,
    reference_adapter,
    restore_masked_diffusion_models,
    tokenizer_of,
)
from .config import bf16_supported
from .hub import LladaHubMixin


# Where the defaults come from: d1's training config (dllm-reasoning/d1, diffu-grpo/slurm_scripts/train.yaml).
D1_RECIPE = "github.com/dllm-reasoning/d1 (diffu-grpo/slurm_scripts/train.yaml)"


@dataclass
class DiffusionGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`DiffusionGRPOTrainer`]: diffu-GRPO (d1) for masked diffusion language models.

    Every [`trl.GRPOConfig`] field keeps its meaning; the defaults of the fields listed here are the d1 recipe
    (dllm-reasoning/d1, `diffu-grpo/slurm_scripts/train.yaml`, the config of its GSM8K, MATH, Countdown and Sudoku
    runs): `num_iterations=12`, `epsilon=0.5`, `beta=0.04`, `num_generations=6` (with
    `per_device_train_batch_size=6`), `temperature=0.9`, `max_completion_length=256`, `diffusion_steps=128`,
    `block_length=32`, `remasking="low_confidence"`, `p_mask_prompt=0.15`, `learning_rate=3e-6`. d1's loss is the
    token mean of the clipped objective over a batch (`loss_type="bnpo"`), its advantages are not divided by the
    group's standard deviation (`scale_rewards="none"`), and its KL term is not reweighted by the ratio
    (`use_bias_correction_kl=False`). The rest of d1's run (LoRA r=128, alpha=64; weight decay 0.1; `max_grad_norm`
    0.2; Adam beta2 0.99; constant schedule with warm-up) is ordinary training settings, left at TRL's defaults here.
    `bf16` defaults to `True` only where the hardware supports it.

    Parameters:
        > Parameters that control the diffusion rollouts

        diffusion_steps (`int`, *optional*, defaults to `128`):
            Denoising steps of `generate` over the `max_completion_length` answer positions.
        block_length (`int`, *optional*, defaults to `32`):
            Semi-autoregressive block length of `generate` (at most `max_completion_length`).
        remasking (`str`, *optional*, defaults to `"low_confidence"`):
            Remasking strategy of `generate` (`"low_confidence"`, `"random"`, `"margin"`, `"entropy"`).

        > Parameters that control the one-step log-probability estimate

        p_mask_prompt (`float`, *optional*, defaults to `0.15`):
            Probability that a prompt token is masked when the per-token log-probabilities are estimated (the
            completion is always fully masked). The masks are fresh for every iteration of a rollout and shared by
            the old, reference and current policy within it. `0` never masks the prompt.

    Refused (a `ValueError` says why): `use_vllm=True`, `use_transformers_continuous_batching=True`,
    `repetition_penalty` other than 1, `cache_implementation` (use `generation_kwargs={"kv_cache": "prefix"}`).

    Example:
        ```python
        >>> from llada_hf.trainers import DiffusionGRPOConfig
        >>> args = DiffusionGRPOConfig(output_dir="out")
        >>> args.num_iterations, args.epsilon, args.beta, args.p_mask_prompt, args.diffusion_steps
        (12, 0.5, 0.04, 0.15, 128)
        ```
    """

    # d1's values for TRL's fields
    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate (d1: 3e-6)."})
    per_device_train_batch_size: int = field(
        default=6, metadata={"help": "Completions per device and step (d1: 6, one prompt's group)."}
    )
    num_generations: int | None = field(default=6, metadata={"help": "Completions per prompt (d1: 6)."})
    max_completion_length: int | None = field(default=256, metadata={"help": "Answer length of `generate` (d1: 256)."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the rollouts (d1: 0.9)."})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (d1: 0.04)."})
    epsilon: float = field(default=0.5, metadata={"help": "Clipping range of the ratio (d1: 0.5)."})
    num_iterations: int = field(default=12, metadata={"help": "Policy updates per batch of rollouts, mu (d1: 12)."})
    loss_type: str = field(
        default="bnpo", metadata={"help": "Aggregation of the per-token loss (d1: token mean over the batch, 'bnpo')."}
    )
    scale_rewards: str = field(
        default="none", metadata={"help": "Advantage scaling (d1: rewards minus the group mean, 'none')."}
    )
    use_bias_correction_kl: bool = field(
        default=False, metadata={"help": "Reweight the KL term by the ratio (d1: no)."}
    )

    # Parameters that control the diffusion rollouts
    diffusion_steps: int = field(default=128, metadata={"help": "Denoising steps of generate (d1: 128)."})
    block_length: int = field(default=32, metadata={"help": "Semi-autoregressive block length of generate (d1: 32)."})
    remasking: str = field(default="low_confidence", metadata={"help": "Remasking strategy of generate (d1)."})

    # Parameters that control the one-step log-probability estimate
    p_mask_prompt: float = field(
        default=0.15,
        metadata={"help": "Probability of masking each prompt token in the one-step log-probability estimate (d1)."},
    )

    def __post_init__(self):
        if self.bf16 is None:  # TRL's default (bf16 unless fp16) is refused by TrainingArguments on a CPU
            self.bf16 = not self.fp16 and bf16_supported(self.use_cpu)
        super().__post_init__()
        self._check_diffusion_fields()
        self._refuse_causal_options()

    def _check_diffusion_fields(self) -> None:
        check_number("beta", self.beta, above=0, inclusive=True, meaning="the KL coefficient; 0 turns it off")
        check_number("epsilon", self.epsilon, above=0, meaning="the clipping range")
        check_number("temperature", self.temperature, above=0, meaning="rollouts are sampled")
        if not 0.0 <= self.p_mask_prompt < 1.0:
            raise ValueError(f"`p_mask_prompt` must lie in [0, 1), got {self.p_mask_prompt!r}.")
        for name in ("diffusion_steps", "block_length", "max_completion_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")

    def _refuse_causal_options(self) -> None:
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise ValueError(
                "vLLM and transformers' continuous batching generate with a causal LM; a masked diffusion model's "
                "rollouts come from its own `generate`. Set `use_vllm=False` and "
                "`use_transformers_continuous_batching=False`."
            )
        if self.repetition_penalty != 1.0:
            raise ValueError(
                f"`repetition_penalty={self.repetition_penalty}` has no meaning for masked diffusion (tokens are not "
                "generated left to right); leave it at 1.0."
            )
        if self.cache_implementation is not None:
            raise ValueError(
                f"`cache_implementation={self.cache_implementation!r}` is a causal-LM cache; for the diffusion "
                "key/value cache pass `generation_kwargs={'kv_cache': 'prefix'}` (or 'dual')."
            )


def check_reference_source(model: "str | PreTrainedModel", args: DiffusionGRPOConfig, peft_config: Any) -> None:
    """Raise a `ValueError` when TRL would need to load the reference model (`beta > 0`, no LoRA) from the path of a
    model that was built in memory and has none."""
    if isinstance(model, str) or args.beta == 0.0 or peft_config is not None or is_peft_model(model):
        return
    if not model.config.name_or_path:
        raise ValueError(
            "With `beta > 0` the reference model is loaded from the model's path (as TRL's GRPOTrainer does), and "
            "this model was built in memory. Save it (`model.save_pretrained(folder)`, with its tokenizer) and pass "
            "the folder as `model`, train a LoRA adapter (`peft_config`; the reference is the adapter disabled), or "
            "set `beta=0`."
        )


def checked_reward_function(reward_func: Any) -> Any:
    """Wrap a reward callable so that an exception it raises, or a reward that is not a finite number (NaN, inf),
    becomes an error naming the function. `None` (the function does not apply to a completion) passes, as in TRL.
    Reward models (modules) and model ids are returned as they are."""
    if isinstance(reward_func, (str, torch.nn.Module)):
        return reward_func
    name = getattr(reward_func, "__name__", type(reward_func).__name__)

    def check(rewards):
        for index, reward in enumerate(rewards):
            if reward is not None and not (isinstance(reward, (int, float)) and math.isfinite(reward)):
                raise ValueError(
                    f"The reward function {name!r} returned {reward!r} for completion {index}; rewards must be finite "
                    "numbers (or None where the function does not apply)."
                )
        return rewards

    def failure(error: Exception) -> RuntimeError:
        return RuntimeError(f"The reward function {name!r} raised {type(error).__name__}: {error}")

    if inspect.iscoroutinefunction(reward_func):

        @functools.wraps(reward_func)
        async def checked_async(*args, **kwargs):
            try:
                rewards = await reward_func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error
            return check(rewards)

        return checked_async

    @functools.wraps(reward_func)
    def checked(*args, **kwargs):
        try:
            rewards = reward_func(*args, **kwargs)
        except Exception as error:
            raise failure(error) from error
        return check(rewards)

    return checked


def one_step_prompt_masks(
    row_seeds: torch.Tensor, iteration: int, prompt_mask: torch.Tensor, p_mask_prompt: float
) -> torch.Tensor:
    """Which prompt tokens the one-step estimate masks, `[B, P]` bool: each real prompt token (`prompt_mask`) with
    probability `p_mask_prompt`, drawn from the row's seed and the iteration, so that every model scoring the row in
    that iteration sees the same masked prompt, whatever batch the row is in.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.trainers.grpo import one_step_prompt_masks
        >>> prompt = torch.ones(2, 1000, dtype=torch.long)
        >>> masks = one_step_prompt_masks(torch.tensor([7, 8]), 0, prompt, 0.15)
        >>> again = one_step_prompt_masks(torch.tensor([7, 8]), 0, prompt, 0.15)  # same seeds and iteration
        >>> torch.equal(masks, again), masks.float().mean() < 0.2
        (True, tensor(True))
        ```
    """
    width = prompt_mask.shape[1]
    draws = torch.stack(
        [
            torch.rand(width, generator=torch.Generator().manual_seed(_iteration_seed(int(seed), iteration)))
            for seed in row_seeds.tolist()
        ]
    )  # [B, P]
    return (draws < p_mask_prompt).to(prompt_mask.device) & prompt_mask.bool()


def _iteration_seed(row_seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([row_seed, iteration]).generate_state(1)[0])


class DiffusionGRPOTrainer(LladaHubMixin, GRPOTrainer):
    """diffu-GRPO (d1) for masked diffusion language models (LLaDA), the TRL way.

    Takes the arguments of [`trl.GRPOTrainer`] (a model instance or id, reward functions, [`DiffusionGRPOConfig`], a
    prompt dataset, `processing_class`, `peft_config`, ...). Completions are sampled with the model's diffusion
    `generate`, and the per-token log-probabilities of GRPO's ratio and KL term are d1's one-step estimates (see
    this module's docstring). Reward functions that raise, or return NaN or infinite rewards, stop training with an
    error naming the function.

    Example:
        ```python
        >>> from datasets import Dataset
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.tokenization import model_token_ids, train_tokenizer
        >>> from llada_hf.trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer
        >>> tokenizer = train_tokenizer(["2+2=4", "3+3=6"], vocab_size=270)
        >>> config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                      **model_token_ids(tokenizer))
        >>> def four(completions, **kwargs):
        ...     return [float(c.strip() == "4") for c in completions]
        >>> trainer = DiffusionGRPOTrainer(
        ...     model=LladaForMaskedDiffusion(config),
        ...     reward_funcs=four,
        ...     args=DiffusionGRPOConfig(output_dir="/tmp/llada-grpo", max_steps=2, per_device_train_batch_size=2,
        ...                              num_generations=2, num_iterations=2, max_completion_length=4,
        ...                              diffusion_steps=4, block_length=4, beta=0.0, bf16=False, report_to="none"),
        ...     train_dataset=Dataset.from_dict({"prompt": ["2+2=", "2+2="]}),
        ...     processing_class=tokenizer,
        ... )
        >>> trainer.train().global_step
        2
        ```
    """

    _tag_names = ["trl", "grpo", "diffu-grpo", "llada-hf", "masked-diffusion"]
    _name = "Diffusion GRPO (diffu-GRPO)"

    def __init__(
        self,
        model: "str | PreTrainedModel",
        reward_funcs: Callable | str | PreTrainedModel | list,
        args: DiffusionGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        args = as_config(args, model, DiffusionGRPOConfig, "DiffusionGRPO")
        model_config, processing_class = checked_model_and_processor(
            model, args, processing_class, "DiffusionGRPOTrainer", "trl.GRPOTrainer"
        )
        check_reference_source(model, args, peft_config)
        tokenizer = tokenizer_of(processing_class)
        self.mask_token_id = adopt_mask_token(model_config, tokenizer)
        reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self._rollouts = 0

        super().__init__(
            model=model,
            reward_funcs=[checked_reward_function(func) for func in reward_funcs],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # TRL's shifted fused head has no meaning for a masked diffusion model: our forward is used again
        restore_masked_diffusion_models(self, self.mask_token_id)
        self.generation_config = self._diffusion_generation_config()
        # A completion also ends at an end-of-turn token (chat models)
        self.eos_token_ids = sorted(set(self.eos_token_ids) | set(end_token_ids(tokenizer, self.generation_config)))

    def _diffusion_generation_config(self) -> DiffusionGenerationConfig:
        """TRL's rollout settings (`self.generation_kwargs`: answer length, sampling, token ids, `generation_kwargs`)
        with the diffusion settings of the config; `generation_kwargs` win over `diffusion_steps` etc."""
        trl_settings = dict(self.generation_kwargs)
        trl_settings.pop("cache_implementation", None)  # None here: a set value is refused by the config
        return DiffusionGenerationConfig(
            **{
                "steps": self.args.diffusion_steps,
                "block_length": min(self.args.block_length, self.args.max_completion_length),
                "remasking": self.args.remasking,
                "mask_token_id": self.mask_token_id,
                **trl_settings,
            }
        )

    # ---- Rollouts: the old and reference log-probabilities of every iteration ----

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollout (diffusion `generate`, rewards, advantages), with the old and reference log-probabilities
        estimated for every iteration ([B, mu, C], `_per_iteration_logps`) and each row's mask seed (`mask_seeds`).

        TRL's rollout scores the old and reference policies once, on the unmasked prompts; d1 needs one estimate per
        iteration, on that iteration's masked prompts, so TRL's values are replaced (where TRL computed them: the
        old policy's only when updates run off-policy, the reference's only with `beta > 0`). The price is TRL's
        two passes, a small part of a rollout's `diffusion_steps` denoising passes.
        """
        output = super()._generate_and_score_completions(inputs)
        row_seeds = self._draw_row_seeds(len(output["prompt_ids"]))
        iterations = list(range(self.num_iterations)) if self.model.training else [0]
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if output.get("old_per_token_logps") is not None:
                output["old_per_token_logps"] = self._per_iteration_logps(self.model, output, row_seeds, iterations)
            if output.get("ref_per_token_logps") is not None:
                with reference_adapter(self):
                    output["ref_per_token_logps"] = self._per_iteration_logps(
                        self.ref_model or self.model, output, row_seeds, iterations
                    )
        output["mask_seeds"] = row_seeds.to(self.accelerator.device)
        return output

    def _draw_row_seeds(self, rows: int) -> torch.Tensor:
        """Fresh seeds for the rows of one rollout, from (seed, process, rollout count): reproducible runs."""
        self._rollouts += 1
        keys = [self.args.seed, self.accelerator.process_index, self._rollouts]
        return torch.from_numpy(np.random.SeedSequence(keys).generate_state(rows, dtype=np.uint32).astype(np.int64))

    def _per_iteration_logps(
        self, model, rollout: dict[str, torch.Tensor], row_seeds: torch.Tensor, iterations: list[int]
    ) -> torch.Tensor:
        """The one-step estimate of a rollout's completions under `model` for each of `iterations`, each on that
        iteration's masked prompts: `[B, len(iterations), C]`."""
        completion_ids = rollout["completion_ids"]
        attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
        # chunks of a device batch, as TRL's rollout scores them
        training = self.model.training
        batch_size = self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
        logps = [
            self._get_per_token_logps_and_entropies(
                model,
                torch.cat([self._masked_prompt_ids(rollout, row_seeds, iteration), completion_ids], dim=1),
                attention_mask,
                completion_ids.shape[1],
                batch_size=batch_size,
            )[0]
            for iteration in iterations
        ]
        return torch.stack(logps, dim=1)

    def _masked_prompt_ids(
        self, batch: dict[str, torch.Tensor], row_seeds: torch.Tensor, iteration: int
    ) -> torch.Tensor:
        """The batch's prompts as the one-step estimate sees them in `iteration`: each real token replaced by the mask
        token with probability `p_mask_prompt` (the rows' seeds and the iteration decide which,
        `one_step_prompt_masks`), so the old, reference and current policies see the same masked prompts."""
        masked = one_step_prompt_masks(row_seeds.cpu(), iteration, batch["prompt_mask"], self.args.p_mask_prompt)
        return batch["prompt_ids"].masked_fill(masked, self.mask_token_id)

    # ---- Loss ----

    def _current_iteration(self) -> int:
        """Which of the `num_iterations` updates on the buffered rollouts this step is (TRL's `_prepare_inputs`
        regenerates every `steps_per_generation * num_iterations` steps, counted by its `_step`)."""
        if not self.model.training:
            return 0
        return (self._step % (self.args.steps_per_generation * self.num_iterations)) // self.args.steps_per_generation

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """TRL's GRPO loss for this iteration: the current policy scored on the iteration's masked prompts (passed
        to TRL as the batch's `prompt_ids`), against the old and reference log-probabilities of the same iteration."""
        iteration = self._current_iteration()
        inputs = {**inputs, "prompt_ids": self._masked_prompt_ids(inputs, inputs["mask_seeds"], iteration)}
        for key in ("old_per_token_logps", "ref_per_token_logps"):
            if inputs.get(key) is not None:
                inputs[key] = inputs[key][:, iteration]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # ---- The one-step log-probability estimate (d1) ----

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """d1's one-step estimate of log pi(o_k | q') for every completion token, in place of TRL's next-token one.

        `input_ids` is the prompt q' as the estimate sees it, then the completion (its last `logits_to_keep`
        columns): the callers mask the prompt (`compute_loss` and `_per_iteration_logps`, with one iteration's
        masks; TRL's own rollout scoring, which is replaced, passes it unmasked).

        1. Follow the prompt with `max_completion_length` mask tokens, all attended (the answer as `generate` sees
           it at its first step), whatever the completion's length.
        2. One forward pass per chunk of `batch_size` rows; log-softmax at the completion positions, read at the
           completion's tokens (and the entropy of that distribution when asked).

        Returns `[B, C]` log-probabilities, the entropies (same shape) or `None`, and no auxiliary loss (LLaDA is
        not a mixture of experts).
        """
        if multimodal_inputs := {key: value for key, value in multimodal.items() if value is not None}:
            raise ValueError(f"DiffusionGRPOTrainer trains text models; got {sorted(multimodal_inputs)}.")
        prompt_width = input_ids.shape[1] - logits_to_keep
        prompt_ids, prompt_mask = input_ids[:, :prompt_width], attention_mask[:, :prompt_width]
        completion_ids = input_ids[:, prompt_width:]  # [B, C]
        chunks = [
            self._one_step_logps(model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows], compute_entropy)
            for rows in torch.arange(len(input_ids)).split(batch_size or len(input_ids))
        ]
        logps = torch.cat([chunk[0] for chunk in chunks])
        entropies = torch.cat([chunk[1] for chunk in chunks]) if compute_entropy else None
        return logps, entropies, None

    def _one_step_logps(
        self,
        model,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        compute_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, prompt_width = prompt_ids.shape
        answer_width = self.args.max_completion_length
        masks = prompt_ids.new_full((rows, answer_width), self.mask_token_id)
        input_ids = torch.cat([prompt_ids, masks], dim=1)  # [b, P + max_completion_length]
        attention_mask = torch.cat([prompt_mask, torch.ones_like(masks)], dim=1)
        kept = torch.arange(prompt_width, prompt_width + completion_ids.shape[1], device=input_ids.device)
        with self.accelerator.autocast():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=kept, use_cache=False
            ).logits
        log_probs = F.log_softmax(logits.float(), dim=-1)  # [b, C, V]
        token_logps = log_probs.gather(-1, completion_ids[..., None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1) if compute_entropy else None
        return token_logps, entropy

    # ---- Hub ----

    def _card_description(self) -> str:
        args = self.args
        rewards = ", ".join(f"`{name}`" for name in self.reward_func_names)
        return (
            "Trained with llada-hf's `DiffusionGRPOTrainer`: diffu-GRPO ([d1](https://arxiv.org/abs/2504.12216)), "
            "GRPO whose per-token log-probabilities are one-step estimates of a masked diffusion model. Settings: "
            f"rewards {rewards}; {args.num_generations} completions per prompt of {args.max_completion_length} "
            f"tokens ({args.diffusion_steps} diffusion steps, blocks of {args.block_length}, {args.remasking} "
            f"remasking, temperature {args.temperature}); p_mask_prompt = {args.p_mask_prompt}; "
            f"{args.num_iterations} iterations per rollout; epsilon = {args.epsilon}; beta = {args.beta}; "
            f"loss {args.loss_type}."
        )
