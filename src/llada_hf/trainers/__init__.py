"""Training masked diffusion language models with TRL: `DiffusionSFTConfig` and `DiffusionSFTTrainer`; preference
optimisation with `DiffusionDPOConfig` / `DiffusionDPOTrainer` (VRPO) and RL with `DiffusionGRPOConfig` /
`DiffusionGRPOTrainer` (diffu-GRPO); a learned decoding policy from the model's own traces with `PolicyTrainingConfig`
/ `learn_decoding_policy`.

```python
from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer

trainer = DiffusionSFTTrainer(
    model=model,
    args=DiffusionSFTConfig(output_dir="out", max_length=512, per_device_train_batch_size=8),
    train_dataset=dataset,  # TRL formats: "messages", "prompt"/"completion", or "text" (pretraining)
    processing_class=tokenizer,
)
trainer.train()
```

LLaDA-V trains the same way on TRL's vision formats ("images" + "messages", "image" + "prompt"/"completion") with
its `LladaVProcessor` as `processing_class`, in the paper's three stages: `DiffusionSFTConfig(stage="projector" |
"instruct" | "reasoning")`, or `DiffusionSFTConfig.for_stage(...)` for the official hyperparameters.
"""

from .collator import DataCollatorForMaskedDiffusion
from .config import DiffusionSFTConfig
from .dpo import DiffusionDPOConfig, DiffusionDPOTrainer
from .grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer
from .objective import mask_answer_tokens, masked_diffusion_loss, masking_probability, sample_times
from .policy import PolicyTrainingConfig, learn_decoding_policy
from .sft import DiffusionSFTTrainer
from .stages import STAGE_PRESETS, apply_stage
from .vision import DataCollatorForVisionMaskedDiffusion, language_model_lora_config


__all__ = [
    "DiffusionSFTConfig",
    "DiffusionSFTTrainer",
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "PolicyTrainingConfig",
    "learn_decoding_policy",
    "DataCollatorForMaskedDiffusion",
    "DataCollatorForVisionMaskedDiffusion",
    "STAGE_PRESETS",
    "apply_stage",
    "language_model_lora_config",
    "sample_times",
    "masking_probability",
    "mask_answer_tokens",
    "masked_diffusion_loss",
]
