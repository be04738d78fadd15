"""Preference optimisation of masked diffusion models with TRL: `DiffusionDPOConfig` and `DiffusionDPOTrainer`
(VRPO, LLaDA 1.5: arXiv:2505.19223).

A masked diffusion model has no left-to-right factorisation, so DPO's log-likelihoods are replaced by the model's
ELBO, estimated by Monte Carlo exactly as `llada_hf.evaluation.log_likelihood` does (docs/LLADA.md sections 4 and 5;
batched and differentiable in `elbo.py`). VRPO lowers the variance of the resulting preference score with three
unbiased techniques, all fields of `DiffusionDPOConfig`: a larger sampling budget n = `n_time` x `n_mask` per ELBO,
its optimal allocation (one mask per timestep, `n_mask=1`, the default), and antithetic sampling (the policy and the
reference model score the same timesteps and masks, `antithetic_sampling=True`).

What is kept from TRL's `DPOTrainer`: the preference dataset formats (`prompt`/`chosen`/`rejected`, implicit prompts,
conversational rows through the chat template) and their tokenization and truncation, `ref_model` or the PEFT
adapter disabled as the reference (or a frozen "ref" copy of a pretrained adapter), LoRA through `peft_config`,
`precompute_ref_log_probs`, `sync_ref_model`, callbacks, logging of rewards/margins/accuracies, checkpointing and
everything `accelerate` runs.

What changes, because TRL assumes next-token log-probabilities:

- TRL patches the model's forward with a fused, *shifted* LM head (`add_fused_lm_head`); the patch is undone right
  after `DPOTrainer.__init__`, and `compute_ref_log_probs` and `compute_loss` are replaced: the only forward calls
  are masked-diffusion ones (`elbo.elbo_estimates`), never a shifted next-token sum.
- Loss types: the ones that depend only on the (ELBO) log-ratios, `"sigmoid"` (DPO; LLaDA 1.5), `"hinge"` and
  `"ipo"`. Options defined on next-token probabilities (`use_weighting`, `ld_alpha`), f-divergences, Liger kernels
  and padding-free batches are refused by the config with a message.
- `precompute_ref_log_probs=True` scores the reference on its own noise, which antithetic sampling cannot do: it
  needs `antithetic_sampling=False`.
- Metrics: TRL's rewards, margins, accuracies and `logps/*` (here ELBO estimates); evaluation returns the loss only
  (there are no next-token logits for `compute_metrics`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback

from .common import (
    adopt_mask_token,
    as_config,
    check_masked_diffusion_model,
    check_number,
    checked_model_and_processor,
    reference_adapter,
    restore_masked_diffusion_models,
    tokenizer_of,
)
from .config import bf16_supported
from .elbo import AnswerBatch, draw_elbo_noise, elbo_estimates, right_align
from .hub import LladaHubMixin


# Loss types that are functions of the sequence log-ratios only (the ELBO replaces the log-likelihood in them).
PREFERENCE_LOSS_TYPES = ("sigmoid", "hinge", "ipo")

# Keys mixed into the noise seeds, so that training and evaluation never share a random stream.
_TRAIN_SEED_KEY, _EVAL_SEED_KEY = 0, 1


@dataclass
class DiffusionDPOConfig(DPOConfig):
    r"""
    Configuration class for [`DiffusionDPOTrainer`]: DPO of masked diffusion language models on ELBO estimates, with
    VRPO's variance reduction (LLaDA 1.5, arXiv:2505.19223).

    Every [`trl.DPOConfig`] field keeps its meaning and default (`beta=0.1`, `loss_type=["sigmoid"]`,
    `learning_rate=1e-6`, `max_length=1024`, ...), except the next-token options listed at the end, which are
    refused. `bf16` defaults to `True` only where the hardware supports it, so the defaults also train on a CPU.

    Each ELBO (policy and reference, chosen and rejected answer) is a Monte-Carlo average over n = `n_time` x `n_mask`
    rows: `n_time` masked-token counts l (the timesteps; l/L plays the role of t), stratified over 1..L and each
    exactly uniform, and for each `n_mask` uniformly random masks of l answer tokens; a row scores (L / l) x the
    cross-entropy summed over its masked tokens (docs/LLADA.md section 4). The estimate is unbiased for the ELBO; its
    variance falls with n. For a fixed n, one mask per timestep (`n_mask=1`) has the lowest variance (VRPO's optimal
    allocation). The forward pass of a batch of B pairs holds 2 B n rows.

    Parameters:
        > Parameters that control the ELBO estimate (VRPO)

        n_time (`int`, *optional*, defaults to `8`):
            Timesteps (masked-token counts) per ELBO estimate.
        n_mask (`int`, *optional*, defaults to `1`):
            Masks per timestep. The budget per ELBO is `n_time * n_mask` rows; `1` is the optimal allocation.
        antithetic_sampling (`bool`, *optional*, defaults to `True`):
            The reference model scores the same timesteps and masks as the policy, so the noise shared by the two
            ELBOs cancels in their difference (the log-ratio). `False` draws the reference's noise independently.

    Refused next-token options (a `ValueError` says what to use instead): `loss_type` values other than
    `"sigmoid"`, `"hinge"` and `"ipo"`, `use_weighting=True` and `ld_alpha` (per-token next-token probabilities),
    `f_divergence_type` other than `"reverse_kl"`, `use_liger_kernel=True`, `padding_free=True`, and
    `precompute_ref_log_probs=True` together with `antithetic_sampling=True`.

    Example:
        ```python
        >>> from llada_hf.trainers import DiffusionDPOConfig
        >>> args = DiffusionDPOConfig(output_dir="out", n_time=16)
        >>> args.n_time * args.n_mask, args.antithetic_sampling, args.loss_type
        (16, True, ['sigmoid'])
        ```
    """

    # Parameters that control the ELBO estimate (VRPO)
    n_time: int = field(
        default=8,
        metadata={"help": "Timesteps (masked-token counts) per ELBO estimate; the budget is n_time * n_mask rows."},
    )
    n_mask: int = field(
        default=1,
        metadata={"help": "Masks per timestep; 1 (one mask per timestep) is VRPO's optimal allocation."},
    )
    antithetic_sampling: bool = field(
        default=True,
        metadata={"help": "The reference model scores the same timesteps and masks as the policy (VRPO)."},
    )

    def __post_init__(self):
        if self.bf16 is None:  # TRL's default (bf16 unless fp16) is refused by TrainingArguments on a CPU
            self.bf16 = not self.fp16 and bf16_supported(self.use_cpu)
        super().__post_init__()
        for name in ("n_time", "n_mask"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"`{name}` must be an integer >= 1 (the ELBO needs at least one sample), got {value!r}."
                )
        check_number("beta", self.beta, above=0, meaning="it scales the log-ratios; TRL's default is 0.1")
        self._refuse_next_token_options()

    def _refuse_next_token_options(self) -> None:
        unsupported = [loss_type for loss_type in self.loss_type if loss_type not in PREFERENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"`loss_type={unsupported}` is not supported by DiffusionDPOTrainer; use one or more of "
                f"{list(PREFERENCE_LOSS_TYPES)} (losses of the sequence log-ratios, here ELBO differences)."
            )
        if self.use_weighting or self.ld_alpha is not None:
            raise ValueError(
                "`use_weighting` and `ld_alpha` reweight per-token next-token probabilities, which a masked diffusion "
                "model does not have. Leave them unset."
            )
        if self.f_divergence_type != "reverse_kl":
            raise ValueError(f"`f_divergence_type={self.f_divergence_type!r}` is not supported; use 'reverse_kl'.")
        if self.use_liger_kernel:
            raise ValueError("`use_liger_kernel=True` is not supported: its kernels assume a causal LM. Leave it off.")
        if self.padding_free:
            raise ValueError("`padding_free=True` is not supported: the ELBO rows are left-padded. Leave it off.")
        if self.precompute_ref_log_probs and self.antithetic_sampling:
            raise ValueError(
                "`precompute_ref_log_probs=True` scores the reference model once, on its own noise, while antithetic "
                "sampling scores it on the policy's masks at every step. Set `antithetic_sampling=False` to "
                "precompute, or leave `precompute_ref_log_probs=False`."
            )

    @property
    def sampling_budget(self) -> int:
        """Monte-Carlo rows per ELBO estimate, `n_time * n_mask`."""
        return self.n_time * self.n_mask


def check_preference_rows(dataset: Dataset | IterableDataset, name: str) -> None:
    """Raise a `ValueError` naming the first row of a map-style preference dataset whose `chosen` or `rejected`
    answer is empty (a string of whitespace, or messages without content): an empty answer has no ELBO."""
    if not isinstance(dataset, Dataset):
        return
    if len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty; it needs at least one preference pair.")
    for column in ("chosen", "rejected"):
        if column not in dataset.column_names:
            raise ValueError(
                f"The {name} dataset has the columns {dataset.column_names}; a preference dataset needs 'chosen' and "
                "'rejected' (and 'prompt', unless the prompt is the answers' common beginning)."
            )
    for row, (chosen, rejected) in enumerate(zip(dataset["chosen"], dataset["rejected"])):
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            if _is_empty_answer(answer):
                raise ValueError(
                    f"Row {row} of the {name} dataset has an empty `{column}` answer; every preference pair needs two "
                    "non-empty answers. Drop or fix the row."
                )


def _is_empty_answer(answer: Any) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    if isinstance(answer, list):  # conversational: the answer's messages
        return all(not str(message.get("content") or "").strip() for message in answer)
    return answer is None


def _noise_seed(args: DiffusionDPOConfig, key: int) -> int:
    return int(np.random.SeedSequence([args.seed, key, args.process_index]).generate_state(1)[0])


def preference_losses(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """Per-pair loss `[B]` of one of `PREFERENCE_LOSS_TYPES`, from the log-ratios log pi(y|x) - log pi_ref(y|x).

    - `"sigmoid"` (DPO, VRPO): -log sigmoid(beta (r_w - r_l));
    - `"hinge"`: max(0, 1 - beta (r_w - r_l));
    - `"ipo"`: (r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2, log-ratios per answer token (as TRL normalises it).
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    if loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    if loss_type == "ipo":
        delta = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"Unknown loss type {loss_type!r}; use one of {list(PREFERENCE_LOSS_TYPES)}.")


class DiffusionDPOTrainer(LladaHubMixin, DPOTrainer):
    """Preference optimisation (DPO with VRPO) of masked diffusion language models (LLaDA), the TRL way.

    Takes the arguments of [`trl.DPOTrainer`] (a model instance or id, an optional `ref_model`, [`DiffusionDPOConfig`],
    a preference dataset in TRL's formats, `processing_class`, `peft_config`, ...) and trains on the DPO loss whose
    log-likelihoods are ELBO estimates (see [`DiffusionDPOConfig`] for the budget and antithetic sampling, and this
    module's docstring for what differs from `DPOTrainer`). Without `ref_model`, the reference is the PEFT model with
    its adapter disabled (LoRA), or a copy of the model loaded from its id, as in TRL.

    The masks are drawn on the CPU from a generator seeded with (`seed`, process), so runs are reproducible;
    evaluation draws from its own generator, reseeded at every `evaluate`, so eval losses compare over training.

    Example:
        ```python
        >>> import copy
        >>> from datasets import Dataset
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.tokenization import model_token_ids, train_tokenizer
        >>> from llada_hf.trainers import DiffusionDPOConfig, DiffusionDPOTrainer
        >>> data = Dataset.from_dict({"prompt": ["2+2=", "3+3="], "chosen": ["4", "6"], "rejected": ["5", "7"]})
        >>> tokenizer = train_tokenizer(["2+2=4", "3+3=6", "5 7"], vocab_size=270)
        >>> config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                      **model_token_ids(tokenizer))
        >>> model = LladaForMaskedDiffusion(config)
        >>> trainer = DiffusionDPOTrainer(
        ...     model=model,
        ...     ref_model=copy.deepcopy(model),
        ...     args=DiffusionDPOConfig(output_dir="/tmp/llada-dpo", max_steps=2, per_device_train_batch_size=2,
        ...                             n_time=4, bf16=False, report_to="none"),
        ...     train_dataset=data,
        ...     processing_class=tokenizer,
        ... )
        >>> trainer.train().global_step
        2
        ```
    """

    _tag_names = ["trl", "dpo", "vrpo", "llada-hf", "masked-diffusion"]
    _name = "Diffusion DPO (VRPO)"

    def __init__(
        self,
        model: "str | PreTrainedModel",
        ref_model: PreTrainedModel | None = None,
        args: DiffusionDPOConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        args = as_config(args, model, DiffusionDPOConfig, "DiffusionDPO")
        # Checked before `DPOTrainer.__init__`, which loads and prepares everything
        model_config, processing_class = checked_model_and_processor(
            model, args, processing_class, "DiffusionDPOTrainer", "trl.DPOTrainer"
        )
        if ref_model is not None:
            check_masked_diffusion_model(
                ref_model, ref_model.config, "DiffusionDPOTrainer (ref_model)", "trl.DPOTrainer"
            )
        eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        for name, data in {"train": train_dataset, **eval_datasets}.items():
            if data is not None:
                check_preference_rows(data, name)
        # The mask token and the noise are needed by `DPOTrainer.__init__` (`precompute_ref_log_probs=True`)
        self.mask_token_id = adopt_mask_token(model_config, tokenizer_of(processing_class))
        self._noise_generators = {
            mode: torch.Generator().manual_seed(_noise_seed(args, key))
            for mode, key in (("train", _TRAIN_SEED_KEY), ("eval", _EVAL_SEED_KEY))
        }

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # TRL's shifted fused head has no meaning for a masked diffusion model: our forward is used again
        restore_masked_diffusion_models(self, self.mask_token_id)

    # ---- The ELBO estimates ----

    def _answer_batch(self, inputs: dict[str, torch.Tensor]) -> AnswerBatch:
        """The collated pairs (chosen rows first, then rejected) with every answer ending at the last column."""
        completion_lengths = inputs["completion_mask"].sum(dim=1)
        if (completion_lengths == 0).any():
            raise ValueError(
                f"An answer has no token left after truncation to `max_length={self.args.max_length}`; raise "
                "`max_length` or shorten the prompts."
            )
        return right_align(inputs)

    def _draw_noise(self, batch: AnswerBatch):
        mode = "train" if self.model.training else "eval"
        return draw_elbo_noise(
            batch.answer_lengths.cpu(), self.args.n_time, self.args.n_mask, self._noise_generators[mode]
        )

    def _reference_elbo(self, batch: AnswerBatch, noise, model: torch.nn.Module | None = None) -> torch.Tensor:
        """ELBO estimates `[R]` under the reference: `ref_model`, or the PEFT model with its adapter disabled (or its
        frozen "ref" adapter), as in TRL."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            reference_adapter(self),
            self.accelerator.autocast(),
        ):
            return elbo_estimates(model or self.ref_model or self.model, batch, noise, self.mask_token_id)

    def compute_ref_log_probs(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ELBOs of the chosen and rejected answers of one collated batch, on fresh noise (used by
        `precompute_ref_log_probs=True`; no next-token log-probabilities)."""
        batch = self._answer_batch(inputs)
        return self._reference_elbo(batch, self._draw_noise(batch), model).chunk(2)

    # ---- Loss ----

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The preference loss on ELBO estimates (the mean over the batch's pairs: `num_items_in_batch` is not used).

        1. Right-align the pairs (chosen rows, then rejected) and draw n = `n_time * n_mask` masks per answer.
        2. Policy ELBOs from one forward pass of the 2 B n masked rows (with gradients).
        3. Reference ELBOs: on the same masks (antithetic sampling), on fresh ones, or precomputed.
        4. The loss of the log-ratios, weighted over `loss_type`s; TRL's reward metrics.
        """
        if return_outputs:
            raise ValueError("DiffusionDPOTrainer returns the loss only: there are no next-token logits to return.")
        mode = "train" if self.model.training else "eval"
        # 1. rows and noise
        batch = self._answer_batch(inputs)
        noise = self._draw_noise(batch)
        # 2. policy
        chosen_logps, rejected_logps = elbo_estimates(model, batch, noise, self.mask_token_id).chunk(2)
        # 3. reference
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_noise = noise if self.args.antithetic_sampling else self._draw_noise(batch)
            ref_chosen_logps, ref_rejected_logps = self._reference_elbo(batch, ref_noise).chunk(2)
        # 4. loss
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        chosen_lengths, rejected_lengths = batch.answer_lengths.chunk(2)
        loss = sum(
            weight
            * preference_losses(
                loss_type, chosen_logratios, rejected_logratios, self.beta, chosen_lengths, rejected_lengths
            ).mean()
            for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True)
        )
        self._record_metrics(mode, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios)
        return loss

    def _record_metrics(
        self,
        mode: str,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        chosen_logratios: torch.Tensor,
        rejected_logratios: torch.Tensor,
    ) -> None:
        """TRL's DPO metrics, over all processes; `logps/*` are ELBO estimates."""
        gather, metrics = self.accelerator.gather, self._metrics[mode]
        chosen_rewards = gather(self.beta * chosen_logratios.detach())
        rejected_rewards = gather(self.beta * rejected_logratios.detach())
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())

    # ---- Evaluation ----

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """`DPOTrainer.evaluate`, with the same noise at every evaluation so that eval losses compare over time."""
        self._noise_generators["eval"].manual_seed(_noise_seed(self.args, _EVAL_SEED_KEY))
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """The evaluation loss only: a masked diffusion model has no next-token logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- Hub ----

    def _card_description(self) -> str:
        args = self.args
        return (
            "Aligned with llada-hf's `DiffusionDPOTrainer`: DPO on ELBO estimates with VRPO's variance reduction "
            "([LLaDA 1.5](https://arxiv.org/abs/2505.19223)). Settings: "
            f"loss {' + '.join(args.loss_type)}, beta = {args.beta}, ELBO budget n = {args.n_time} timesteps x "
            f"{args.n_mask} mask(s) per answer, antithetic sampling {'on' if args.antithetic_sampling else 'off'}, "
            f"reference {'precomputed' if args.precompute_ref_log_probs else 'scored at every step'}."
        )
