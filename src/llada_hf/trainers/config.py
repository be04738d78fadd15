"""`DiffusionSFTConfig`: TRL's `SFTConfig` plus the controls of the masked-diffusion training objective."""

from dataclasses import dataclass, field

from trl import SFTConfig

from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from .stages import PROMPT_TEMPLATES, STAGE_PRESETS, check_stage


LOSS_NORMALIZATIONS = ("answer_length", "token", "sequence")
VISION_TOWER_DTYPES = ("bfloat16", "float16", "float32")


def bf16_supported(use_cpu: bool) -> bool:
    """Whether `TrainingArguments` accepts `bf16=True` on this machine (a bf16-capable GPU, or XLA)."""
    return not use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available())


def refuse_sequence_sharding(parallelism_config) -> None:
    """Raise a `ValueError` if an accelerate `ParallelismConfig` splits rows across processes.

    Context parallelism (`cp_size > 1`) and sequence parallelism (`sp_size > 1`) shard each row's positions. The
    masked-diffusion loss divides each row by its whole answer length and LLaDA attends in both directions, and
    neither is carried across shards here, so such a run would train on a wrong loss: it is refused.
    """
    if parallelism_config is None:
        return
    for size, enabled in (("cp_size", "cp_enabled"), ("sp_size", "sp_enabled")):
        if getattr(parallelism_config, enabled, False):
            raise ValueError(
                f"`{size} > 1` (context / sequence parallelism) is not supported by DiffusionSFTTrainer: it shards "
                "each row, while the diffusion loss is normalized over the whole answer of a row. Set it to 1 and "
                "use data parallelism (DDP, FSDP or DeepSpeed ZeRO split the batch by rows); for long rows, "
                "gradient checkpointing lowers memory."
            )


@dataclass
class DiffusionSFTConfig(SFTConfig):
    r"""
    Configuration class for [`DiffusionSFTTrainer`]: supervised fine-tuning and pretraining of masked diffusion
    language models (LLaDA).

    Every [`trl.SFTConfig`] and [`~transformers.TrainingArguments`] field keeps its meaning (TRL's defaults included:
    `gradient_checkpointing=True`, `learning_rate=2e-5`), except the next-token options listed at the end, which are
    refused. `bf16` defaults to `True` only where the hardware supports it (and `fp16` is not set), so the defaults
    also train on a CPU. The defaults of the fields below reproduce the LLaDA training
    recipe: per sequence t ~ U(0, 1), each answer token is masked with probability p = (1 - ε) t + ε, the loss is
    the cross-entropy at the masked positions weighted by 1/p, divided by the answer length of each row (EOS padding
    included), averaged over rows.

    Parameters:
        > Parameters that control the noise

        time_epsilon (`float`, *optional*, defaults to `1e-3`):
            ε in p = (1 - ε) t + ε: the smallest masking probability, which keeps the 1/p weight finite.
        antithetic_time (`bool`, *optional*, defaults to `False`):
            Draw the times of a batch's rows stratified: one t from each of the n intervals [i/n, (i+1)/n), shuffled
            across the rows, instead of n independent draws. Same expected loss, lower variance of its estimate.
        noise_samples_per_example (`int`, *optional*, defaults to `1`):
            Noise each example this many times (each copy with its own t and mask) in the same forward pass, and
            average. Lowers the variance of the loss at the cost of a proportionally larger batch.
        random_length_prob (`float`, *optional*, defaults to `0.01`):
            Pretraining only (batches without prompt tokens, e.g. a `"text"` dataset): the probability that a batch
            is cut to a random length drawn uniformly from [1, batch length], so the model also sees short sequences.

        > Parameters that control the loss

        loss_normalization (`str`, *optional*, defaults to `"answer_length"`):
            How the 1/p-weighted cross-entropy sums are normalized. `"answer_length"`: each row's sum is divided by
            the row's answer length (EOS padding included), then rows are averaged (the LLaDA SFT rule; for
            pretraining rows of full length it is LLaDA's division by batch size times length). `"token"`: the
            sum over all rows is divided by the number of answer tokens, so long answers weigh more. `"sequence"`:
            each row's sum (a Monte-Carlo estimate of the answer's negative ELBO in nats) is averaged over rows.
            In every case the denominator counts the rows or tokens of the whole optimizer step, across gradient
            accumulation and (with `average_tokens_across_devices=True`, the default) across processes, so the loss
            and its gradient do not depend on how a batch is split.

        > Parameters that control the data preprocessing

        pad_answers_with_eos (`bool`, *optional*, defaults to `True`):
            Pad the answer of each example that has a prompt (prompt-completion and conversational data) with EOS
            tokens up to the batch length; these EOS tokens are attended, masked and scored like any answer token,
            which teaches the model to stop (LLaDA SFT rule). Rows without a prompt (pretraining text) and, when
            `False`, all rows get ordinary padding: not attended, never scored.

        > Parameters that control vision-language training (LLaDA-V; see `trainers/stages.py`)

        stage (`str` or `None`, *optional*, defaults to `None`):
            A LLaDA-V training stage: `"projector"` (stage 1, alignment: only the projector trains, on captions with
            the `"plain"` template), `"instruct"` (stage 2, visual instructions) or `"reasoning"` (stage 3, chains of
            thought); stages 2 and 3 train the vision tower, projector and language model, the tower at a lower
            learning rate. Sets which modules train (without `peft_config`, which decides that itself) and the
            defaults of `prompt_template` and `vision_tower_learning_rate`. The official hyperparameters (learning
            rate, batch, schedule, length) come with [`DiffusionSFTConfig.for_stage`] or `llada-hf train --stage`.
        prompt_template (`str` or `None`, *optional*, defaults to `None`):
            How an image row becomes a prompt: `"chat"` (the processor's chat template) or `"plain"` (the images
            alone, then the caption and a newline: the official stage-1 `llada_plain`). `None`: `"plain"` for
            `stage="projector"`, else `"chat"`.
        vision_tower_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the vision tower's parameters. `None`: `learning_rate` times the stage's ratio (0.2 for
            `"instruct"` and `"reasoning"`, the official 2e-6 / 1e-5), or `learning_rate` without a stage.
        vision_tower_dtype (`str` or `None`, *optional*, defaults to `None`):
            Keep a *frozen* vision tower in this dtype (`"bfloat16"`, `"float16"`) to save memory while the rest
            trains in its own precision. The tower must be frozen (`stage="projector"`, or by `peft_config`).

    Refused next-token options (a `ValueError` says what to use instead): `padding_free=True` and the `"bfd"` /
    `"bfd_split"` packing strategies (they rely on position ids with varlen attention kernels; use
    `packing_strategy="wrapped"`, which cuts the text into full-length rows like LLaDA pretraining),
    `assistant_only_loss=True` (every assistant turn is already its own example, prompt = everything before it),
    `loss_type="dft"` and `label_smoothing_factor > 0` (reweightings of next-token probabilities). Context and
    sequence parallelism (`parallelism_config` with `cp_size` or `sp_size` > 1) are refused too: they shard rows,
    and the loss is normalized per whole row (data parallelism works; see `refuse_sequence_sharding`).

    Example:
        ```python
        >>> from llada_hf.trainers import DiffusionSFTConfig
        >>> args = DiffusionSFTConfig(output_dir="out", max_length=512, antithetic_time=True)
        >>> args.time_epsilon, args.loss_normalization, args.pad_answers_with_eos
        (0.001, 'answer_length', True)
        ```
    """

    # Parameters that control the noise
    time_epsilon: float = field(
        default=1e-3,
        metadata={"help": "ε in the masking probability p = (1 - ε) t + ε; keeps the 1/p loss weight finite."},
    )
    antithetic_time: bool = field(
        default=False,
        metadata={
            "help": "Draw the rows' times stratified over [0, 1) (one per interval) to lower the loss variance."
        },
    )
    noise_samples_per_example: int = field(
        default=1,
        metadata={"help": "Noise each example this many times in the same batch and average the losses."},
    )
    random_length_prob: float = field(
        default=0.01,
        metadata={
            "help": "Pretraining batches (no prompt tokens) are cut to a random length uniform in [1, batch length] "
            "with this probability."
        },
    )

    # Parameters that control the loss
    loss_normalization: str = field(
        default="answer_length",
        metadata={
            "help": "'answer_length' (each row divided by its answer length incl. EOS padding, LLaDA SFT rule), "
            "'token' (divided by the answer tokens of the batch) or 'sequence' (per-row sum, averaged over rows).",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )

    # Parameters that control the data preprocessing
    pad_answers_with_eos: bool = field(
        default=True,
        metadata={
            "help": "Pad answers with scored EOS tokens up to the batch length (LLaDA SFT rule). Rows without a "
            "prompt always get ordinary, unscored padding."
        },
    )

    # Parameters that control vision-language training (LLaDA-V)
    stage: str | None = field(
        default=None,
        metadata={
            "help": "LLaDA-V training stage: 'projector' (stage 1: projector only, plain captions), 'instruct' (stage "
            "2) or 'reasoning' (stage 3): tower + projector + language model, the tower at a lower learning rate.",
            "choices": [None, *STAGE_PRESETS],
        },
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Image rows: 'chat' (the processor's chat template) or 'plain' (images, then caption + newline: "
            "official stage 1). Default: 'plain' for stage 'projector', else 'chat'.",
            "choices": [None, *PROMPT_TEMPLATES],
        },
    )
    vision_tower_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the vision tower. Default: the stage's ratio (0.2) x learning_rate."},
    )
    vision_tower_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Keep a frozen vision tower in this dtype ('bfloat16', 'float16') to save memory.",
            "choices": [None, *VISION_TOWER_DTYPES],
        },
    )

    def __post_init__(self):
        if self.bf16 is None:  # TRL's default (bf16 unless fp16) is refused by TrainingArguments on a CPU
            self.bf16 = not self.fp16 and bf16_supported(self.use_cpu)
        super().__post_init__()
        self._check_diffusion_fields()
        self._check_vision_fields()
        self._refuse_next_token_options()
        refuse_sequence_sharding(self.parallelism_config)

    @classmethod
    def for_stage(cls, stage: str, **kwargs) -> "DiffusionSFTConfig":
        """A config for a LLaDA-V training stage with the official hyperparameters as defaults (full-size runs).

        The values of `STAGE_PRESETS[stage].official_args` (docs/LLADA_V.md section 5: learning rate, tower learning
        rate, batch per device, accumulation, cosine schedule, warm-up ratio 0.03, maximum length) are used unless
        given in `kwargs`.

        Example:
            ```python
            >>> from llada_hf.trainers import DiffusionSFTConfig
            >>> args = DiffusionSFTConfig.for_stage("instruct", output_dir="out")
            >>> args.learning_rate, args.vision_tower_learning_rate, args.gradient_accumulation_steps, args.stage
            (1e-05, 2e-06, 4, 'instruct')
            >>> DiffusionSFTConfig.for_stage("projector", output_dir="out", learning_rate=5e-4).learning_rate
            0.0005
            ```
        """
        check_stage(stage)
        return cls(**{**STAGE_PRESETS[stage].official_args, "stage": stage, **kwargs})

    @property
    def image_prompt_template(self) -> str:
        """The template of image rows: `prompt_template`, else the stage's (`"plain"` for stage 1), else `"chat"`."""
        if self.prompt_template is not None:
            return self.prompt_template
        return STAGE_PRESETS[self.stage].prompt_template if self.stage is not None else "chat"

    def _check_vision_fields(self) -> None:
        check_stage(self.stage)
        if self.prompt_template is not None and self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"`prompt_template` must be one of {PROMPT_TEMPLATES} (or None), got {self.prompt_template!r}."
            )
        if self.vision_tower_learning_rate is not None and not self.vision_tower_learning_rate >= 0:
            raise ValueError(f"`vision_tower_learning_rate` must be >= 0, got {self.vision_tower_learning_rate}.")
        if self.vision_tower_dtype is not None and self.vision_tower_dtype not in VISION_TOWER_DTYPES:
            raise ValueError(
                f"`vision_tower_dtype` must be one of {VISION_TOWER_DTYPES} (or None), "
                f"got {self.vision_tower_dtype!r}."
            )

    def _check_diffusion_fields(self) -> None:
        if not 0.0 <= self.time_epsilon < 1.0:
            raise ValueError(f"`time_epsilon` must lie in [0, 1), got {self.time_epsilon}.")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"`loss_normalization` must be one of {LOSS_NORMALIZATIONS}, got {self.loss_normalization!r}."
            )
        if not isinstance(self.noise_samples_per_example, int) or self.noise_samples_per_example < 1:
            raise ValueError(
                f"`noise_samples_per_example` must be an integer >= 1, got {self.noise_samples_per_example!r}."
            )
        if not 0.0 <= self.random_length_prob <= 1.0:
            raise ValueError(f"`random_length_prob` must lie in [0, 1], got {self.random_length_prob}.")

    def _refuse_next_token_options(self) -> None:
        if self.padding_free:
            raise ValueError(
                "`padding_free=True` is not supported: it flattens the batch and relies on position ids with varlen "
                "attention kernels. Leave it off; for pretraining text use `packing=True, packing_strategy='wrapped'`."
            )
        if self.packing and self.packing_strategy != "wrapped":
            raise ValueError(
                f"`packing_strategy={self.packing_strategy!r}` is not supported: it implies padding-free batches. Use "
                "`packing_strategy='wrapped'`, which cuts the text into full-length rows like LLaDA pretraining."
            )
        if self.assistant_only_loss:
            raise ValueError(
                "`assistant_only_loss=True` is not needed: each assistant turn of a conversation is trained as its "
                "own example, with everything before it as the prompt. Leave it `False`."
            )
        if self.loss_type != "nll":
            raise ValueError(
                f"`loss_type={self.loss_type!r}` reweights next-token probabilities and has no diffusion "
                "counterpart here. Leave it at 'nll'; see `loss_normalization` for the diffusion loss options."
            )
        if self.label_smoothing_factor > 0:
            raise ValueError("`label_smoothing_factor` is not supported by the masked-diffusion loss; set it to 0.")
