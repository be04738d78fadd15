"""What the llada-hf preference and RL trainers share on top of TRL: their arguments, the mask token, and undoing
TRL's next-token LM head."""

import math

from trl.trainer.utils import get_config_model_id

from transformers import TrainingArguments

from .sft import resolve_mask_token_id


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


class MaskTokenMixin:
    """`mask_token_id` of a TRL trainer on a masked diffusion model: the model config's, else the tokenizer's
    (`resolve_mask_token_id`), resolved on first use and written to the config, where `generate` reads it."""

    _mask_token_id: int | None = None

    @property
    def mask_token_id(self) -> int:
        if self._mask_token_id is None:
            config = self.accelerator.unwrap_model(self.model).config
            self._mask_token_id = resolve_mask_token_id(config, self._tokenizer)
            config.get_text_config().mask_token_id = self._mask_token_id
        return self._mask_token_id


def check_number(name: str, value, *, above: float, inclusive: bool = False, meaning: str = "") -> None:
    """Refuse a setting that is not a finite real number above `above` (or equal, with `inclusive`): NaN would
    otherwise train silently (a loss of 0.0) and inf overflow. `meaning` says what the setting does."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < above or (value == above and not inclusive):
        bound = f">= {above}" if inclusive else f"> {above}"
        raise ValueError(f"`{name}` must be a finite number {bound}{f' ({meaning})' if meaning else ''}, "
                         f"got {value!r}.")
