"""llada-hf: LLaDA-family masked diffusion language models on the Hugging Face stack.

Importing this package registers the model with transformers' Auto classes:

```python
import llada_hf
from transformers import AutoModel
model = AutoModel.from_pretrained("path/to/LLaDA-8B-Instruct")  # official layout, no conversion step
```
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoProcessor,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_llada import LladaConfig
from .configuration_llada_v import LladaVConfig
from .decoding_llada import DiffusionGenerationOutput, RemaskingStrategy, register_remasking_strategy
from .generation_llada import DiffusionGenerationConfig
from .modeling_llada import LladaForMaskedDiffusion, LladaModel, LladaPreTrainedModel, MaskedDiffusionOutput
from .modeling_llada_v import LladaVForConditionalGeneration, LladaVModel, LladaVPreTrainedModel
from .policy_llada import DecodingPolicy, LearnedDecodingPolicy
from .processing_llada_v import LladaVProcessor
from .streaming_llada import TextDiffusionStreamer, end_token_ids, truncate_at_eos


__version__ = "0.1.0"

# The tooling (TRL, PEFT, huggingface_hub) is imported on first use, so `import llada_hf` stays as light as
# loading a model needs.
_LAZY = {
    "DiffusionSFTConfig": "trainers",
    "DiffusionSFTTrainer": "trainers",
    "DataCollatorForMaskedDiffusion": "trainers",
    "DiffusionDPOConfig": "trainers",
    "DiffusionDPOTrainer": "trainers",
    "DiffusionGRPOConfig": "trainers",
    "DiffusionGRPOTrainer": "trainers",
    "PolicyTrainingConfig": "trainers",
    "learn_decoding_policy": "trainers",
    "publish": "hub_card",
    "publish_folder": "hub_card",
    "render_model_card": "hub_card",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

AutoConfig.register("llada", LladaConfig, exist_ok=True)
# The official checkpoints map AutoModel and AutoModelForCausalLM to their LM class; scripts written for
# them keep working. AutoModelForMaskedLM is the honest name for what the model is.
for _auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
    _auto.register(LladaConfig, LladaForMaskedDiffusion, exist_ok=True)

# LLaDA-V. The official checkpoints' model type `llava_llada` reads into the same config class (registered on the
# mapping itself: AutoConfig.register insists the class's own model_type be the key). AutoModel gives the model
# with its head, as for the text model, so `AutoModel.from_pretrained(...).generate(...)` works.
AutoConfig.register("llada_v", LladaVConfig, exist_ok=True)
CONFIG_MAPPING.register("llava_llada", LladaVConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageTextToText):
    _auto.register(LladaVConfig, LladaVForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LladaVConfig, LladaVProcessor, exist_ok=True)
LladaVProcessor.register_for_auto_class("AutoProcessor")  # saved processors name their class in auto_map

__all__ = [
    "LladaConfig",
    "LladaModel",
    "LladaPreTrainedModel",
    "LladaForMaskedDiffusion",
    "MaskedDiffusionOutput",
    "LladaVConfig",
    "LladaVModel",
    "LladaVPreTrainedModel",
    "LladaVForConditionalGeneration",
    "LladaVProcessor",
    "DiffusionGenerationConfig",
    "DiffusionGenerationOutput",
    "RemaskingStrategy",
    "DecodingPolicy",
    "LearnedDecodingPolicy",
    "TextDiffusionStreamer",
    "register_remasking_strategy",
    "end_token_ids",
    "truncate_at_eos",
    "DiffusionSFTConfig",
    "DiffusionSFTTrainer",
    "DataCollatorForMaskedDiffusion",
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "PolicyTrainingConfig",
    "learn_decoding_policy",
    "publish",
    "publish_folder",
    "render_model_card",
]
