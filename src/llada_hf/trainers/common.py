"""What the llada-hf trainers share on top of TRL: their arguments, the model check, the mask token, the models
as TRL's `__init__` leaves them, and the reference policy."""

import contextlib
import math

from accelerate.utils import is_peft_model
from trl.trainer.utils import get_config_model_id, use_adapter

from transformers import (
    AutoConfig,
    AutoProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainingArguments,
)

from ..tokenization import set_mask_token
from .fused_head import remove_fused_lm_head


# Model types trained by the trainers when the model is given as an id or path (checked on its config).
MASKED_DIFFUSION_MODEL_TYPES = ("llada", "llada_v")


def as_config(args: TrainingArguments | None, model, config_class: type, run_suffix: str):
    """`args` as an instance of `config_class` (TRL's own conversion of plain `TrainingArguments` or of the TRL
    config); `None` gives the defaults, with an output directory named after the model and `run_suffix`."""
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_class(f"{model_name.split('/')[-1] or 'model'}-{run_suffix}")
    if isinstance(args, config_class):
        return args
    dict_args = args.to_dict()
    # `to_dict` hides the value of every field named "*_token" (`hub_token`, and TRL's `eos_token` / `pad_token`)
    dict_args.update({key: getattr(args, key) for key in dict_args if key.endswith("_token")})
    return config_class(**dict_args)


def check_masked_diffusion_model(
    model: "str | PreTrainedModel", config: PreTrainedConfig, trainer: str, causal_trainer: str
) -> None:
    """Raise a `TypeError` unless `model` is a masked diffusion model (LLaDA); the message names `trainer` and the
    TRL trainer to use for an autoregressive model (`causal_trainer`).

    An instance must have the diffusion `generate` (a `DiffusionGenerationMixin` in its class hierarchy; matched by
    name so that a model loaded with `trust_remote_code` from a copy of our bundle counts). An id or path is judged
    by its config's `model_type`.
    """
    if isinstance(model, str):
        if config.model_type in MASKED_DIFFUSION_MODEL_TYPES:
            return
        found = f"'{model}' is a {config.model_type!r} checkpoint"
    else:
        base = model.get_base_model() if is_peft_model(model) else model
        if any(cls.__name__ == "DiffusionGenerationMixin" for cls in type(base).__mro__):
            return
        found = f"got {type(base).__name__}"
    raise TypeError(
        f"{trainer} trains masked diffusion language models (LLaDA, e.g. `LladaForMaskedDiffusion`); "
        f"{found}. For an autoregressive model use `{causal_trainer}`."
    )


def checked_model_and_processor(
    model: "str | PreTrainedModel",
    args: TrainingArguments,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin | None,
    trainer: str,
    causal_trainer: str,
) -> tuple[PreTrainedConfig, PreTrainedTokenizerBase | ProcessorMixin]:
    """The model's config and processing class, for the checks made before TRL's `__init__` (which loads the model
    and prepares the data).

    An id's config is read without loading the weights (TRL loads them later) and must be a masked diffusion model's
    (`check_masked_diffusion_model`). A missing `processing_class` is loaded as TRL would load it: the mask token
    is needed before TRL's `__init__`.
    """
    hub_kwargs = {
        "revision": (args.model_init_kwargs or {}).get("revision"),
        "trust_remote_code": args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(model, **hub_kwargs) if isinstance(model, str) else model.config
    check_masked_diffusion_model(model, config, trainer, causal_trainer)
    if processing_class is None:
        model_id = model if isinstance(model, str) else get_config_model_id(config)
        processing_class = AutoProcessor.from_pretrained(model_id, **hub_kwargs)
    return config, processing_class


def tokenizer_of(processing_class: PreTrainedTokenizerBase | ProcessorMixin) -> PreTrainedTokenizerBase:
    """The tokenizer of a processing class: a processor's (LLaDA-V), or the tokenizer itself."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def resolve_mask_token_id(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The mask token id: the model config's `mask_token_id`, else the tokenizer's mask token (they must agree)."""
    from_config, from_tokenizer = getattr(config, "mask_token_id", None), tokenizer.mask_token_id
    if from_config is None and from_tokenizer is None:
        raise ValueError(
            "No mask token: the model config has no `mask_token_id` and the tokenizer has no mask token. Set "
            "`model.config.mask_token_id`, or add one to the tokenizer (`tokenizer.add_special_tokens("
            "{'mask_token': '<|mdm_mask|>'})`, resizing the embeddings if the token is new)."
        )
    if from_config is not None and from_tokenizer is not None and from_config != from_tokenizer:
        raise ValueError(
            f"The model config's `mask_token_id` ({from_config}) differs from the tokenizer's mask token id "
            f"({from_tokenizer}); they must name the same token."
        )
    mask_token_id = from_tokenizer if from_config is None else from_config
    vocab_size = config.get_text_config().vocab_size
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"The mask token id {mask_token_id} lies outside the model's vocabulary [0, {vocab_size}); check that "
            "the config's `mask_token_id` and the tokenizer belong to this model."
        )
    return mask_token_id


def adopt_mask_token(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The mask token id a trainer trains with (`resolve_mask_token_id`), named on `tokenizer` where it has no mask
    token: the tokenizer is saved with the model, so tools reading it find the mask."""
    mask_token_id = resolve_mask_token_id(config, tokenizer)
    set_mask_token(tokenizer, mask_token_id)
    return mask_token_id


def restore_masked_diffusion_models(trainer, mask_token_id: int) -> None:
    """The models TRL's `__init__` prepared (`trainer.model`, and `trainer.ref_model` where the trainer has one),
    made masked diffusion models again: their own forward (TRL's fused, shifted LM head undone) and `mask_token_id`
    in their config, where `generate` reads it (it may have come from the tokenizer)."""
    for model in (trainer.model, getattr(trainer, "ref_model", None)):  # an SFT trainer has no reference
        if model is not None:
            unwrapped = trainer.accelerator.unwrap_model(model)
            remove_fused_lm_head(unwrapped)
            unwrapped.config.get_text_config().mask_token_id = mask_token_id


def reference_adapter(trainer) -> contextlib.AbstractContextManager:
    """What makes `trainer.model` score as the reference policy, as in TRL's DPO and GRPO trainers: nothing when
    there is a `ref_model` (or no PEFT adapter), else the adapter disabled, or the frozen "ref" copy of a pretrained
    adapter that is trained further."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is not None or not is_peft_model(unwrapped):
        return contextlib.nullcontext()
    return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)


def check_number(name: str, value, *, above: float, inclusive: bool = False, meaning: str = "") -> None:
    """Refuse a setting that is not a finite real number above `above` (or equal, with `inclusive`): NaN would
    otherwise train silently (a loss of 0.0) and inf overflow. `meaning` says what the setting does."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < above or (value == above and not inclusive):
        bound = f">= {above}" if inclusive else f"> {above}"
        raise ValueError(f"`{name}` must be a finite number {bound}{f' ({meaning})' if meaning else ''}, "
                         f"got {value!r}.")
