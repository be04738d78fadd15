"""The three LLaDA-V training stages as presets: which modules train, at which learning rate, with which template.

LLaDA-V is trained by supervised fine-tuning only, in three stages (docs/LLADA_V.md section 5; the official scripts
`train/scripts/**` of ML-GSAI/LLaDA-V, built on LLaVA-NeXT):

| stage         | data                                  | trains                   | template | lr (tower)  | length |
|---------------|---------------------------------------|--------------------------|----------|-------------|--------|
| `"projector"` | image captions (LLaVA-Pretrain 558K)  | projector                | `plain`  | 1e-3 (-)    | 8192   |
| `"instruct"`  | visual instructions (MAmmoTH-VL)      | tower, projector, LM     | `chat`   | 1e-5 (2e-6) | 16384  |
| `"reasoning"` | chains of thought (VisualWebInstruct) | tower, projector, LM     | `chat`   | 1e-5 (2e-6) | 8192   |

`DiffusionSFTConfig(stage=...)` selects the trainable modules, the prompt template and the tower's learning rate;
`DiffusionSFTConfig.for_stage(...)` (and `llada-hf train --stage ...`) also take the official hyperparameters of
`StagePreset.official_args` as defaults, for full-size runs. Every official stage runs one epoch
(`--num_train_epochs 1`), with a cosine schedule, warm-up ratio 0.03 and no weight decay (our default too).

What each stage's script sets, and where the presets stand:
- Stage 1 (`llada_v_pretrain.sh`): batch 16 per device on 4 GPUs, maximum length 8192, template `llada_plain`
  (the image, the caption, a newline: no EOS, which comes only as padding). It sets neither `image_aspect_ratio` nor
  `mm_patch_merge_type`, so the training script's defaults hold (`"square"`, `"flat"`): each image is squashed to one
  crop, its features follow without anyres grid or `image_newline`. The `plain` template packs images so
  (`vision_aspect_ratio="square"` in the batch; `DataCollatorForVisionMaskedDiffusion`).
- Stage 2 (`llada_v_si_10M.sh`, then `llada_v_ov_2M.sh`): batch 1 per device, accumulation 4, 64 GPUs, the last
  incomplete batch dropped; `anyres_max_4` packing. Its two parts differ in maximum length: 8192 for the
  single-image part, 16384 for the OneVision part. The preset follows the OneVision part (16384): it is the stage's
  final part, the one whose weights the stage hands on, and its several-image rows need the room; a maximum length
  only cuts longer rows, never pads, so single-image rows within 8192 tokens train the same under either (pass
  `max_length=8192` to run the single-image part exactly as its script).
- Stage 3 (`llada_v_vw.sh`): the settings of stage 2 with maximum length 8192 (its variant mixed with OneVision
  data, `llada_v_mix_ov_vw.sh`, uses 16384).
- Not taken: `group_by_modality_length` in stages 2-3 (LLaVA's own sampler, which orders the rows so that a global
  batch holds one modality of similar lengths: a data order, `group_by_length` is transformers' nearest),
  `torch_compile` and `tf32` (speed, hardware), `frames_upbound` (video, not taken here), DeepSpeed ZeRO-3 (a
  launcher choice: `accelerate launch --config_file ...`).

The module groups of `LladaVForConditionalGeneration`, by parameter name: the vision tower (`model.vision_tower.*`),
the projector (`model.multi_modal_projector.*`) and the language model (everything else: `model.language_model.*`,
`model.image_newline`, `lm_head.*`). As in the official code (`mm_tunable_parts`), `image_newline` trains with the
language model, not in stage 1.
"""

from dataclasses import dataclass, field
from typing import Any

import torch


VISION_TOWER, PROJECTOR, LANGUAGE_MODEL = "vision_tower", "multi_modal_projector", "language_model"
MODULE_PREFIXES = {VISION_TOWER: "model.vision_tower.", PROJECTOR: "model.multi_modal_projector."}
PROMPT_TEMPLATES = ("chat", "plain")

# Shared by every stage (docs/LLADA_V.md section 5, "Common settings"): one epoch (transformers' default is 3),
# cosine schedule, warm-up ratio 0.03 (a float `warmup_steps` below 1 is a ratio). DeepSpeed ZeRO-3 is a launcher
# choice (`accelerate launch --config_file ...`); bf16, gradient checkpointing and no weight decay are already
# `DiffusionSFTConfig`'s defaults (bf16 where the hardware has it).
_COMMON_ARGS = {"num_train_epochs": 1, "lr_scheduler_type": "cosine", "warmup_steps": 0.03}
# Stages 2 and 3, which train everything: batch 1 per device, accumulation 4 (64 GPUs: global 256), the tower at
# 2e-6, the last incomplete batch dropped
_FULL_TUNING_ARGS = {**_COMMON_ARGS, "learning_rate": 1e-5, "vision_tower_learning_rate": 2e-6,
                     "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "dataloader_drop_last": True}


@dataclass(frozen=True)
class StagePreset:
    """One LLaDA-V training stage.

    Args:
        trainable: the module groups that train (`"vision_tower"`, `"multi_modal_projector"`, `"language_model"`).
        prompt_template: `"plain"` (the image as one squashed crop, then the caption: official `llada_plain` with
            the stage-1 packing) or `"chat"` (the processor's chat template: official `llava_llada`).
        vision_tower_lr_ratio: the tower's learning rate over the others' when `vision_tower_learning_rate` is
            unset (official: 2e-6 / 1e-5); `None` when the tower is frozen.
        official_args: the official hyperparameters, as `DiffusionSFTConfig` fields (per device: the official
            global batch also counts the GPUs, 4 for stage 1 and 64 for stages 2 and 3).
    """

    trainable: tuple[str, ...]
    prompt_template: str
    vision_tower_lr_ratio: float | None
    official_args: dict[str, Any] = field(default_factory=dict)


STAGE_PRESETS: dict[str, StagePreset] = {
    # Stage 1, alignment (llada_v_pretrain.sh): LLaVA-Pretrain 558K captions, batch 16 per device on 4 GPUs
    "projector": StagePreset(
        trainable=(PROJECTOR,),
        prompt_template="plain",
        vision_tower_lr_ratio=None,
        official_args={**_COMMON_ARGS, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
                       "gradient_accumulation_steps": 1, "max_length": 8192},
    ),
    # Stage 2, visual instruction tuning (llada_v_si_10M.sh, then llada_v_ov_2M.sh): the OneVision part's maximum
    # length (the module docstring says why)
    "instruct": StagePreset(
        trainable=(VISION_TOWER, PROJECTOR, LANGUAGE_MODEL),
        prompt_template="chat",
        vision_tower_lr_ratio=0.2,
        official_args={**_FULL_TUNING_ARGS, "max_length": 16384},
    ),
    # Stage 3, multimodal reasoning (llada_v_vw.sh): stage 2's settings on chains of thought, maximum length 8192
    "reasoning": StagePreset(
        trainable=(VISION_TOWER, PROJECTOR, LANGUAGE_MODEL),
        prompt_template="chat",
        vision_tower_lr_ratio=0.2,
        official_args={**_FULL_TUNING_ARGS, "max_length": 8192},
    ),
}


def check_stage(stage: str | None) -> None:
    if stage is not None and stage not in STAGE_PRESETS:
        raise ValueError(f"`stage` must be one of {tuple(STAGE_PRESETS)} (or None), got {stage!r}.")


def module_group(parameter_name: str) -> str:
    """The module group (`"vision_tower"`, `"multi_modal_projector"` or `"language_model"`) of a parameter name of
    `LladaVForConditionalGeneration` (a PEFT wrapper's prefixes are allowed)."""
    for group, prefix in MODULE_PREFIXES.items():
        if prefix in parameter_name:
            return group
    return LANGUAGE_MODEL


def is_vision_language_model(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model under a PEFT wrapper) is LLaDA-V: it has a vision tower and a projector."""
    names = {name for name, _ in model.named_modules()}
    return any(name.endswith("vision_tower") for name in names) and any(name.endswith(PROJECTOR) for name in names)


def apply_stage(model: torch.nn.Module, stage: str) -> dict[str, int]:
    """Train exactly the module groups of `stage` (`requires_grad`); return the trainable parameter count per group.

    Example:
        ```python
        >>> from llada_hf import LladaConfig, LladaVConfig, LladaVForConditionalGeneration
        >>> from llada_hf.trainers.stages import apply_stage
        >>> text = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                    num_attention_heads=4, mask_token_id=63)
        >>> vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...               image_size=28, patch_size=14, vision_use_head=False)
        >>> model = LladaVForConditionalGeneration(LladaVConfig(text_config=text, vision_config=vision,
        ...                                                     image_token_id=62, image_grid_pinpoints=[[28, 28]]))
        >>> apply_stage(model, "projector")
        {'vision_tower': 0, 'multi_modal_projector': 1600, 'language_model': 0}
        ```
    """
    check_stage(stage)
    if not is_vision_language_model(model):
        raise ValueError(
            f"`stage={stage!r}` is a LLaDA-V training stage (vision tower, projector, language model), but the model "
            f"({type(model).__name__}) has no vision tower. Use `LladaVForConditionalGeneration`, or leave `stage` "
            "unset for a text model."
        )
    trainable = STAGE_PRESETS[stage].trainable
    counts = {VISION_TOWER: 0, PROJECTOR: 0, LANGUAGE_MODEL: 0}
    for name, parameter in model.named_parameters():
        group = module_group(name)
        parameter.requires_grad_(group in trainable)
        counts[group] += parameter.numel() if group in trainable else 0
    return counts


def vision_tower_learning_rate(args) -> float:
    """The tower's learning rate: `args.vision_tower_learning_rate`, else the stage's ratio times `learning_rate`,
    else `learning_rate`."""
    if getattr(args, "vision_tower_learning_rate", None) is not None:
        return args.vision_tower_learning_rate
    stage = getattr(args, "stage", None)
    ratio = STAGE_PRESETS[stage].vision_tower_lr_ratio if stage is not None else None
    return args.learning_rate * ratio if ratio is not None else args.learning_rate


def split_vision_tower_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module, tower_lr: float) -> None:
    """Move the vision tower's parameters of every optimizer group into a twin group with learning rate `tower_lr`
    (same weight decay and other options). Done before the scheduler exists, so it scales each group from its own
    learning rate."""
    tower = {id(p) for name, p in model.named_parameters() if module_group(name) == VISION_TOWER}
    for group in list(optimizer.param_groups):
        tower_params = [p for p in group["params"] if id(p) in tower]
        if not tower_params or group["lr"] == tower_lr:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in tower]
        options = {key: value for key, value in group.items() if key != "params"}
        options.update(lr=tower_lr, **({"initial_lr": tower_lr} if "initial_lr" in group else {}))
        optimizer.add_param_group({**options, "params": tower_params})
