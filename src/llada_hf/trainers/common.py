"""Shared argument handling of the llada-hf trainers."""

from transformers import TrainingArguments
from trl.trainer.utils import get_config_model_id


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
