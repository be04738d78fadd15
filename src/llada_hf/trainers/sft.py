"""`DiffusionSFTTrainer`: TRL's `SFTTrainer` with the masked-diffusion objective of LLaDA.

What is kept from TRL: model loading (id or instance), `processing_class`, `peft_config`, dataset preparation
(`messages` through the chat template, `prompt`/`completion`, `text`, pre-tokenized `input_ids`), truncation,
`packing_strategy="wrapped"`, callbacks, logging, checkpointing, `push_to_hub`, and everything `accelerate` runs
(DDP, FSDP, DeepSpeed configs pass through unchanged; there is no distributed code here).

What changes, because TRL assumes next-token prediction:

- Loss: the causal-LM loss is replaced by the masked-diffusion loss (`objective.masked_diffusion_loss`).
- Labels are never shifted. TRL's fused LM head (which it installs on the model) is called with position-aligned
  targets through its `shift_labels` input, so position l is scored against its own token; only masked positions
  carry a target. TRL's own shifting path is never used.
- Multi-turn conversations: every assistant turn becomes its own prompt-completion example (prompt = all messages
  before it), instead of one sequence trained everywhere or only on its last turn.
- Batches: `DataCollatorForMaskedDiffusion` (right padding, answers padded with scored EOS tokens) replaces TRL's
  collator; padding-free batches and bfd packing (position ids with varlen kernels) are refused by the config.
- Metrics: next-token entropy and token accuracy are replaced by masked-token accuracy, mean t and answer tokens
  per batch (summed over processes); loss is logged as usual.
- Evaluation returns only the loss: there are no next-token logits to hand to `compute_metrics`, so the trainer
  takes no `compute_metrics`, `preprocess_logits_for_metrics` or `compute_loss_func`.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names, is_conversational_from_value, maybe_convert_to_chatml

from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback, TrainingArguments

from .collator import DataCollatorForMaskedDiffusion
from .common import (
    adopt_mask_token,
    as_config,
    checked_model_and_processor,
    restore_masked_diffusion_models,
    tokenizer_of,
)
from .config import DiffusionSFTConfig, refuse_sequence_sharding
from .fused_head import fused_lm_head
from .hub import LladaHubMixin
from .objective import mask_answer_tokens, masked_diffusion_loss, masking_probability, random_length, sample_times
from .stages import apply_stage, is_vision_language_model, split_vision_tower_groups, vision_tower_learning_rate
from .vision import (
    DataCollatorForVisionMaskedDiffusion,
    check_vision_training,
    is_vision_example,
    keep_frozen_tower_in,
    repeat_image_inputs,
)


# Keys mixed into the noise seeds, so that training and evaluation never share a random stream.
_TRAIN_SEED_KEY, _EVAL_SEED_KEY = 0, 1


def split_assistant_turns(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """One prompt-completion example per assistant turn of a conversational (`messages`) dataset.

    The prompt is every message before the turn (earlier assistant turns included), the completion is the turn.
    Other columns are copied to every example of their conversation. Datasets without `messages` (or TRL's
    `conversations` with `from`/`value` keys) are returned unchanged.

    Example:
        ```python
        >>> from datasets import Dataset
        >>> from llada_hf.trainers.sft import split_assistant_turns
        >>> chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        ...         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        >>> pairs = split_assistant_turns(Dataset.from_dict({"messages": [chat]}))
        >>> [(len(p), c[0]["content"]) for p, c in zip(pairs["prompt"], pairs["completion"])]
        [(1, 'Hello'), (3, '4')]
        ```
    """
    columns = get_dataset_column_names(dataset)
    if "conversations" in columns and is_conversational_from_value(next(iter(dataset))):
        dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations")
        columns = get_dataset_column_names(dataset)
    if "messages" not in columns:
        return dataset

    def split(batch: dict[str, list]) -> dict[str, list]:
        other_columns = [column for column in batch if column != "messages"]
        out = {column: [] for column in [*other_columns, "prompt", "completion"]}
        for row, messages in enumerate(batch["messages"]):
            for turn, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                out["prompt"].append(messages[:turn])
                out["completion"].append([message])
                for column in other_columns:
                    out[column].append(batch[column][row])
        return out

    return dataset.map(split, batched=True, remove_columns=columns)


def check_dataset_format(dataset: Dataset | IterableDataset, text_field: str, name: str) -> None:
    """Raise a `ValueError` unless `dataset` is in a format the trainer prepares (after `split_assistant_turns`)."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(
            f"The {name} dataset is empty (a conversational dataset needs at least one assistant turn to train on)."
        )
    columns = set(get_dataset_column_names(dataset))
    has_nulls = isinstance(dataset, Dataset) and {"prompt", "completion"} <= columns and any(
        dataset.data.column(name).null_count for name in ("prompt", "completion"))  # Arrow counts: no row is read
    if has_nulls:
        missing = next((i for i, row in enumerate(dataset.select_columns(["prompt", "completion"]))
                        if row["prompt"] is None or row["completion"] is None), None)
        if missing is not None:
            raise ValueError(f"Row {missing} of the {name} dataset has no prompt or no completion (None): drop it or "
                             "fill it in.")
    if {"prompt", "completion"} <= columns or text_field in columns or "input_ids" in columns:
        return
    raise ValueError(
        f"The {name} dataset has the columns {sorted(columns)}, none of the formats DiffusionSFTTrainer trains on: "
        f"'messages' (conversations), 'prompt' + 'completion', '{text_field}' (plain text, pretraining; the name is "
        "set by `dataset_text_field`) or pre-tokenized 'input_ids'. Rename the columns or pass a `formatting_func`."
    )


def check_eos_token(tokenizer: PreTrainedTokenizerBase, eos_token: str | None) -> None:
    """Raise a `ValueError` when there is no EOS token: answers are padded with it, and TRL appends it to every
    completion (it would fail on `endswith(None)`)."""
    if eos_token is None and tokenizer.eos_token is None:
        raise ValueError(
            "The tokenizer has no EOS token (`tokenizer.eos_token` is None): answers end with it and are padded with "
            "it. Set one (`tokenizer.eos_token = '<|endoftext|>'`) or pass `DiffusionSFTConfig(eos_token=...)`."
        )


def is_pretraining_batch(batch: dict[str, torch.Tensor]) -> bool:
    """Whether every attended token of the batch is maskable (no prompt), as in pretraining on plain text."""
    return bool(((batch["labels"] != -100) == batch["attention_mask"].bool()).all())


class DiffusionSFTTrainer(LladaHubMixin, SFTTrainer):
    """Supervised fine-tuning and pretraining of masked diffusion language models (LLaDA), the TRL way.

    Takes the arguments of [`trl.SFTTrainer`] (a model instance or id, [`DiffusionSFTConfig`], datasets in TRL's
    formats, `processing_class`, `peft_config`, ...) and trains with the masked-diffusion loss: each step masks the
    answer tokens of every row with a random probability and scores the model's predictions at the masked positions
    (see [`DiffusionSFTConfig`] for the noise and normalization options, and this module's docstring for what differs
    from `SFTTrainer`). Prompt tokens are never masked; plain-text (`"text"`) datasets are pretraining: every token
    is maskable.

    Loss normalization across gradient accumulation and processes: before each optimizer step the trainer counts
    the rows (or answer tokens, for `loss_normalization="token"`) of all its micro-batches, summed over processes
    when `average_tokens_across_devices=True` (the default). Each micro-batch's loss is its sum divided by that
    count, times the number of processes (DDP averages gradients over processes). The gradient is thus the
    gradient of the loss of the whole step, however it is split; the loss curve of 2 processes x 2 rows equals that
    of 1 process x 2 rows x 2 accumulation steps.

    Noise is drawn from a generator seeded per micro-batch from (`seed`, step, global micro-batch index), so a run
    resumed from a checkpoint draws the same noise as an uninterrupted one, and evaluation uses the same noise at
    every evaluation, which makes eval losses comparable over training.

    Example:
        ```python
        >>> from datasets import Dataset
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.tokenization import model_token_ids, train_tokenizer
        >>> from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer
        >>> data = Dataset.from_dict({"prompt": ["2+2=", "3+3="], "completion": ["4", "6"]})
        >>> tokenizer = train_tokenizer(["2+2=4", "3+3=6"], vocab_size=270)
        >>> config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                      **model_token_ids(tokenizer))
        >>> trainer = DiffusionSFTTrainer(
        ...     model=LladaForMaskedDiffusion(config),
        ...     args=DiffusionSFTConfig(output_dir="/tmp/llada-sft", max_steps=2, per_device_train_batch_size=2,
        ...                             bf16=False, report_to="none"),
        ...     train_dataset=data,
        ...     processing_class=tokenizer,
        ... )
        >>> trainer.train().global_step
        2
        ```
    """

    _tag_names = ["trl", "sft", "llada-hf", "masked-diffusion"]
    _name = "Diffusion SFT"
    # `compute_loss` divides by the item count of the whole optimizer step (`get_batch_samples`)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: "str | PreTrainedModel",
        args: DiffusionSFTConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict], str] | None = None,
    ):
        args = as_config(args, model, DiffusionSFTConfig, "DiffusionSFT")

        # Everything is checked before `SFTTrainer.__init__`, which prepares the data and creates `output_dir`.
        # Conversations are split first: TRL decides from the first raw example whether the prompt is excluded.
        if train_dataset is not None:
            train_dataset = split_assistant_turns(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: split_assistant_turns(data) for key, data in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = split_assistant_turns(eval_dataset)
        if formatting_func is None:
            eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
            for name, data in {"train": train_dataset, **eval_datasets}.items():
                if data is not None:
                    check_dataset_format(data, args.dataset_text_field, name)

        model_config, processing_class = checked_model_and_processor(
            model, args, processing_class, "DiffusionSFTTrainer", "trl.SFTTrainer"
        )
        vision_dataset = train_dataset is not None and is_vision_example(next(iter(train_dataset)))
        check_vision_training(model_config, processing_class, vision_dataset, args.stage)
        tokenizer = tokenizer_of(processing_class)
        self.mask_token_id = adopt_mask_token(model_config, tokenizer)
        check_eos_token(tokenizer, args.eos_token)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        # TRL's fused head stays on the model for good; here it is on only inside `compute_loss` (`fused_lm_head`)
        restore_masked_diffusion_models(self, self.mask_token_id)
        # An accelerate config file can enable context / sequence parallelism without `args` knowing
        refuse_sequence_sharding(getattr(self.accelerator, "parallelism_config", None))
        if data_collator is None and vision_dataset:  # images: loaded and processed batch by batch
            self.data_collator = DataCollatorForVisionMaskedDiffusion(
                processing_class,
                pad_answers_with_eos=args.pad_answers_with_eos,
                prompt_template=args.image_prompt_template,
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        elif data_collator is None:  # built after TRL settled the pad and EOS tokens (`args.eos_token`)
            self.data_collator = DataCollatorForMaskedDiffusion(
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_answers_with_eos=args.pad_answers_with_eos,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self._noise_generator = torch.Generator(device=self.accelerator.device)
        self._apply_vision_settings(peft_config)

    def _apply_vision_settings(self, peft_config: Any) -> None:
        """LLaDA-V: the stage's trainable modules (unless PEFT chose them), and a frozen tower's lower precision."""
        if self.args.stage is not None and peft_config is None:
            apply_stage(self.model, self.args.stage)
        if self.args.vision_tower_dtype is not None:
            keep_frozen_tower_in(self.model, getattr(torch, self.args.vision_tower_dtype))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """TRL's optimizer; for LLaDA-V the vision tower's parameters get their own learning rate
        (`vision_tower_learning_rate`, or the stage's share of `learning_rate`)."""
        building = self.optimizer is None
        optimizer = super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if building and is_vision_language_model(opt_model):
            split_vision_tower_groups(optimizer, opt_model, vision_tower_learning_rate(self.args))
        return optimizer

    # ---- Data ----

    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin,
        args: DiffusionSFTConfig,
        packing: bool,
        formatting_func: Callable[[dict], str] | None,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        """TRL's preparation, after splitting conversations into one example per assistant turn.

        TRL silently drops examples that truncation to `max_length` leaves without a trainable token (a prompt that
        fills `max_length`); here that is an error, so that no example is lost unnoticed. (Checked for map-style
        datasets; an `IterableDataset` is prepared lazily, and TRL drops such examples as they stream by.)
        """
        dataset = split_assistant_turns(dataset)
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if isinstance(dataset, Dataset) and not packing and len(prepared) < len(dataset):
            raise ValueError(
                f"{len(dataset) - len(prepared)} of the {len(dataset)} {dataset_name} examples have no answer token "
                f"left after truncation to `max_length={args.max_length}`: their prompt fills it. Raise `max_length`, "
                "or shorten or drop these prompts."
            )
        return prepared

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, torch.Tensor]:
        """The micro-batches of one optimizer step, with their noise seeds, and the loss items they hold.

        The pretraining random-length cut is applied here, before counting, so every normalization sees the cut
        batch. The count covers all micro-batches and, with `average_tokens_across_devices`, all processes.
        """
        batch_samples = []
        for micro_batch in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            cut_seed, noise_seed = self._micro_batch_seeds(micro_batch)
            batch = self._maybe_cut_to_random_length(batch, cut_seed)
            batch["noise_seed"] = noise_seed  # read (and removed) by `compute_loss`
            batch_samples.append(batch)
        return batch_samples, self._count_loss_items(batch_samples, device)

    def _micro_batch_seeds(self, micro_batch: int) -> list[int]:
        """Two seeds (random-length cut, noise) from (seed, step, global micro-batch index).

        The global index (micro-batch x processes + rank) gives 2 processes x 1 micro-batch the same noise as
        1 process x 2 micro-batches; the step makes a resumed run draw what the uninterrupted one drew.
        """
        index = micro_batch * self.accelerator.num_processes + self.accelerator.process_index
        keys = [self.args.seed, _TRAIN_SEED_KEY, self.state.global_step, index]
        return [int(seed) for seed in np.random.SeedSequence(keys).generate_state(2)]

    def _maybe_cut_to_random_length(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """With probability `random_length_prob`, cut a pretraining batch to a random length (LLaDA pretraining)."""
        if self.args.random_length_prob == 0 or not is_pretraining_batch(batch):
            return batch
        generator = torch.Generator().manual_seed(seed)
        if torch.rand(1, generator=generator).item() >= self.args.random_length_prob:
            return batch
        length = random_length(batch["input_ids"].shape[1], generator)
        return {key: value[:, :length] for key, value in batch.items()}

    def _count_loss_items(self, batch_samples: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """Rows (answer tokens for `loss_normalization="token"`) of the step's micro-batches, noise copies included."""
        if self.args.loss_normalization == "token":
            count = sum(int((batch["labels"] != -100).sum()) for batch in batch_samples)
        else:
            count = sum(len(batch["labels"]) for batch in batch_samples)
        count = torch.tensor(count * self.args.noise_samples_per_example, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count).sum()
        return count

    # ---- Loss ----

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Noise the answers of the batch, predict the masked tokens, return the masked-diffusion loss.

        1. Seed the noise (training: the micro-batch's seed; evaluation: the stream seeded by `evaluate`).
        2. Copy each row `noise_samples_per_example` times.
        3. Per row draw t, set p = (1 - ε) t + ε, and mask each answer token with probability p.
        4. Score the original tokens at the masked positions (TRL's fused LM head, position-aligned targets).
        5. Sum the 1/p-weighted cross-entropy per row and normalize it (`loss_normalization`).
        """
        mode = "train" if self.model.training else "eval"
        # 1. seed
        noise_seed = inputs.pop("noise_seed", None)
        if noise_seed is not None:
            self._noise_generator.manual_seed(noise_seed)
        answer_tokens = (inputs["labels"] != -100).sum()
        # 2. copies
        copies = self.args.noise_samples_per_example
        input_ids, attention_mask, labels = (
            inputs[key].repeat_interleave(copies, dim=0) for key in ("input_ids", "attention_mask", "labels")
        )
        image_inputs = repeat_image_inputs(inputs, copies)  # LLaDA-V: each copy keeps its row's images
        # 3. noise
        answer_mask = labels != -100  # [B, L]
        t = sample_times(len(input_ids), self.args.antithetic_time, self._noise_generator, input_ids.device)  # [B]
        mask_prob = masking_probability(t, self.args.time_epsilon)
        noisy_ids, masked = mask_answer_tokens(
            input_ids, answer_mask, mask_prob, self.mask_token_id, self._noise_generator
        )
        # 4. score: `shift_labels` are used as given (no shift); -100 everywhere but at the masked positions
        with fused_lm_head(self.accelerator.unwrap_model(model)):
            outputs = model(
                input_ids=noisy_ids,
                attention_mask=attention_mask,
                shift_labels=labels.masked_fill(~masked, -100),
                fused_lm_head=True,
                use_cache=False,
                **image_inputs,
            )
        # 5. loss
        loss = masked_diffusion_loss(
            token_nll=-outputs.log_probs,
            masked=masked,
            mask_prob=mask_prob,
            answer_lengths=answer_mask.sum(dim=1),
            normalization=self.args.loss_normalization,
            num_items=num_items_in_batch,
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # The count spans every process, and DDP averages the gradients over processes
            loss = loss * self.accelerator.num_processes

        self._record_metrics(mode, t, masked, outputs.is_top1, answer_tokens)
        return (loss, outputs) if return_outputs else loss

    def _record_metrics(
        self, mode: str, t: torch.Tensor, masked: torch.Tensor, is_top1: torch.Tensor, answer_tokens: torch.Tensor
    ) -> None:
        """Masked-token accuracy, mean t and answer tokens of the batch, over all processes (averaged by `log`)."""
        gather = self.accelerator.gather
        num_masked = gather(masked.sum()).sum()
        num_correct = gather(is_top1.sum()).sum()  # zero wherever nothing is masked
        metrics = self._metrics[mode]
        metrics["masked_token_accuracy"].append((num_correct / num_masked.clamp(min=1)).item())
        metrics["mean_t"].append((gather(t.sum()).sum() / gather(torch.tensor(len(t), device=t.device)).sum()).item())
        metrics["answer_tokens"].append(gather(answer_tokens).sum().item())

    # ---- Evaluation ----

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """`SFTTrainer.evaluate`, with the same noise at every evaluation so that eval losses compare over time."""
        keys = [self.args.seed, _EVAL_SEED_KEY, self.accelerator.process_index]
        self._noise_generator.manual_seed(int(np.random.SeedSequence(keys).generate_state(1)[0]))
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """The evaluation loss only: a masked diffusion model has no next-token logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
