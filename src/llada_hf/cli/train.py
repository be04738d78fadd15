"""`llada-hf train`: DiffusionSFTConfig fields as flags, a local dataset; works under `accelerate launch`.

LLaDA-V folders train with their processor on image datasets; `--stage projector|instruct|reasoning` selects the stage
preset and takes the official hyperparameters as defaults (any flag given overrides them).
"""

import argparse
from dataclasses import dataclass, field

from peft import LoraConfig
from trl import TrlParser

from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

from ..configuration_llada_v import LladaVConfig
from ..loading import check_model_path
from ..trainers import STAGE_PRESETS, DiffusionSFTConfig, DiffusionSFTTrainer, language_model_lora_config
from .dataset_files import load_local_dataset


@dataclass
class TrainScriptArguments:
    model_name_or_path: str = field(metadata={"help": "A saved model folder (or Hub id) to fine-tune."})
    dataset_path: str = field(metadata={"help": "A .json/.jsonl/.parquet file or a `save_to_disk` folder."})
    dataset_split: str = field(default="train", metadata={"help": "The split to train on."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})


def run(args: argparse.Namespace) -> None:
    """Fine-tune with the flags in `args.flags` (read by TRL's parser, as `trl sft` reads its own) and save the
    model into `--output_dir`."""
    script_args, training_args = parse_train_flags(args.flags)
    # Paths first (the dataset's is checked before it is read): a typo must not cost a model load
    check_model_path(script_args.model_name_or_path)
    dataset = load_local_dataset(script_args.dataset_path, script_args.dataset_split)
    path = script_args.model_name_or_path
    vision = AutoConfig.from_pretrained(path).model_type == LladaVConfig.model_type
    processor = (AutoProcessor if vision else AutoTokenizer).from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    trainer = DiffusionSFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=processor,
                                  peft_config=lora_config(script_args, vision))
    trainer.train()
    trainer.save_model()


def parse_train_flags(flags: list[str]) -> tuple[TrainScriptArguments, DiffusionSFTConfig]:
    """The script's and the trainer's arguments; a `--stage` preset's official hyperparameters are the defaults."""
    parser = TrlParser((TrainScriptArguments, DiffusionSFTConfig), prog="llada-hf train")
    stage = stage_in_flags(flags)
    if stage is not None:
        parser.set_defaults(**STAGE_PRESETS[stage].official_args)
    return parser.parse_args_and_config(flags)


def stage_in_flags(flags: list[str]) -> str | None:
    """The value of `--stage` (`--stage X` or `--stage=X`) when it names a preset; the parser judges the rest."""
    for index, flag in enumerate(flags):
        value = flag.split("=", 1)[1] if flag.startswith("--stage=") else flags[index + 1] if (
            flag == "--stage" and index + 1 < len(flags)) else None
        if value in STAGE_PRESETS:
            return value
    return None


def lora_config(script_args: TrainScriptArguments, vision: bool) -> LoraConfig | None:
    """`--use_peft`: LoRA on every linear layer; for a vision model on the language model only, the projector fully
    trained. None without it."""
    if not script_args.use_peft:
        return None
    if vision:
        return language_model_lora_config(r=script_args.lora_r, lora_alpha=script_args.lora_alpha)
    return LoraConfig(r=script_args.lora_r, lora_alpha=script_args.lora_alpha, target_modules="all-linear")
