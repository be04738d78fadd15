"""Loading a saved model for the `llada-hf` commands and the server, and checking the settings both are given.

It imports neither the commands (`llada_hf.cli`) nor the server (`llada_hf.serving`): both import it. Errors are
`CliError`s, printed as one line by the command.
"""

import argparse
import math
import os

import torch

from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, ProcessorMixin

from llada_hf_cli import DTYPES, GENERATION_FLAGS, CliError

from .configuration_llada_v import LladaVConfig
from .modeling_llada import check_local_folder


def check_generation_args(args: argparse.Namespace) -> None:
    """Refuse, in one line, what `generate` would fail on deep inside: non-finite numbers, an unknown dtype, a
    device this machine does not have. Fills in the default device."""
    for name in (name for name, kind, _, _ in GENERATION_FLAGS if kind is float):
        value = getattr(args, name, None)  # `tune` has no generation flags
        if value is not None and not math.isfinite(value):
            raise CliError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
    if args.dtype not in DTYPES:
        raise CliError(f"--dtype {args.dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)  # a malformed name is a RuntimeError: one line
    if device.type != "cpu" and not _has_accelerator(device.type):
        raise CliError(f"--device {args.device}: this machine has no {device.type} device; use --device cpu.")


def _has_accelerator(device_type: str) -> bool:
    return torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == device_type


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The generation flags that were given, as `generate` keyword arguments (the others: the checkpoint's
    generation_config)."""
    names = [name for name, _, _, _ in GENERATION_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def check_model_path(path: str) -> None:
    """A missing local folder is named as such (not taken for a Hub id); offline, only folders are possible."""
    check_local_folder(path)
    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CliError(f"{path!r} is not a local folder and HF_HUB_OFFLINE=1; pass the path of a saved model.")


def load_model_and_processor(path: str, dtype: str, device: str, with_images: bool = False):
    """The model and what prepares its inputs: a text model's tokenizer, or a vision model's (config model type
    `llada_v`) processor. A text model asked to take images is refused before its weights are read."""
    check_model_path(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    vision = model_type == LladaVConfig.model_type
    if with_images and not vision:
        raise CliError(f"{path} is a text model (model_type {model_type!r}); --image needs a LLaDA-V model "
                       "(model_type 'llada_v').")
    # an official LLaDA-V folder ships only a tokenizer: `LladaVProcessor` builds the official preprocessing from
    # the model config
    processor = AutoProcessor.from_pretrained(path) if vision else AutoTokenizer.from_pretrained(path)
    text_tokenizer(processor).padding_side = "left"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModel.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, processor


def is_vision_processor(processor) -> bool:
    """A processor (images + text) rather than a tokenizer."""
    return isinstance(processor, ProcessorMixin)


def text_tokenizer(processor):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return processor.tokenizer if is_vision_processor(processor) else processor
