"""The `llada-hf` command: demo, generate, chat, train, eval, publish, export, serve.

Every subcommand has `--help`. Errors are one line on stderr with what to change, and a non-zero exit code.
"""

import argparse
import json
import math
import os
import sys

from llada_hf_cli import (  # noqa: F401  (the parser lives there: `llada-hf --help` needs no torch)
    DEMO_OUTPUT_DIR,
    DTYPES,
    GENERATION_FLAGS,
    CliError,
    add_generation_options,
    add_image_option,
    build_parser,
    main,
)


# ---- generate and chat ---------------------------------------------------------------------------


def check_generation_args(args: argparse.Namespace) -> None:
    """Refuse, in one line, what `generate` would fail on deep inside: non-finite numbers, an unknown dtype, a
    device this machine does not have. Fills in the default device."""
    import torch

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
    import torch

    return torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == device_type


def generation_kwargs(args: argparse.Namespace) -> dict:
    names = [name for name, _, _, _ in GENERATION_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def check_model_path(path: str) -> None:
    """A missing local folder is named as such (not taken for a Hub id); offline, only folders are possible."""
    from .modeling_llada import check_local_folder

    check_local_folder(path)
    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CliError(f"{path!r} is not a local folder and HF_HUB_OFFLINE=1; pass the path of a saved model.")


def load_model_and_processor(path: str, dtype: str, device: str, with_images: bool = False):
    """The model and what prepares its inputs: a text model's tokenizer, or a vision model's (config model type
    `llada_v`) processor. A text model asked to take images is refused before its weights are read."""
    import torch

    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import llada_hf  # noqa: F401  (registers the Auto classes)

    from .configuration_llada_v import LladaVConfig

    check_model_path(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    vision = model_type == LladaVConfig.model_type
    if with_images and not vision:
        raise CliError(f"{path} is a text model (model_type {model_type!r}); --image needs a LLaDA-V model "
                       "(model_type 'llada_v').")
    processor = load_vision_processor(path) if vision else AutoTokenizer.from_pretrained(path)
    text_tokenizer(processor).padding_side = "left"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModel.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, processor


def load_vision_processor(path: str):
    """The folder's `AutoProcessor` (for an official folder, which ships only a tokenizer, `LladaVProcessor` builds
    the official preprocessing from the model config)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def is_vision_processor(processor) -> bool:
    """A processor (images + text) rather than a tokenizer."""
    from transformers import ProcessorMixin

    return isinstance(processor, ProcessorMixin)


def text_tokenizer(processor):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return processor.tokenizer if is_vision_processor(processor) else processor


def load_images(paths: list[str] | None) -> list:
    """The `--image` files as RGB-convertible PIL images; a missing or unreadable file is named (before any model
    is loaded)."""
    from PIL import Image

    images = []
    for path in paths or []:
        if not os.path.isfile(path):
            raise CliError(f"--image {path!r} does not exist.")
        try:
            image = Image.open(path)
            image.load()
        except OSError as error:
            raise CliError(f"--image {path}: not a readable image file ({error}).") from None
        images.append(image)
    return images


def user_message(text: str, images: list) -> dict:
    """A user turn: its images first (each becomes `<image>` in the prompt, as in the official LLaDA-V prompt),
    then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                        {"type": "text", "text": text}]}


def chat_inputs(processor, conversations: list[list[dict]], device: str) -> dict:
    """Model inputs for a batch of conversations ending with a user turn: the chat template with the assistant
    header, tokenized and left-padded; a processor adds the images (`pixel_values`, `image_sizes`, ...)."""
    if is_vision_processor(processor):
        return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt",
                                             processor_kwargs={"padding": True}).to(device)
    from .generation_llada import left_pad
    from .tokenization import chat_prompt_ids

    # special tokens come only from the template: text a user typed is text (`chat_prompt_ids`)
    ids, mask = left_pad([chat_prompt_ids(processor, messages) for messages in conversations], processor.pad_token_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def text_inputs(tokenizer, texts: list[str], device: str) -> dict:
    """`input_ids` and `attention_mask` of the texts as they are, left-padded."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


class StepProgress:
    """A streamer that only advances a tqdm bar, once per denoising step (`generate` calls `put_draft` after each).

    Shown on stderr when it is a terminal; silent when piped or with `--quiet`.
    """

    def __init__(self, total_steps: int, quiet: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, unit="step", leave=False, disable=quiet or not sys.stderr.isatty())

    def put(self, value) -> None:
        pass  # the prompt and committed blocks: nothing to count

    def put_draft(self, value, **kwargs) -> None:
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def planned_steps(model, kwargs: dict) -> int:
    """The steps `generate` will run at most (it can stop early: parallel decoding, early exit)."""
    config = model.generation_config
    return kwargs.get("steps") or config.steps or kwargs.get("max_new_tokens") or config.max_new_tokens


def answer_streamer(model, tokenizer, prefix: str = ""):
    """Live drafts on a terminal, the committed answer up to its end token (EOS / EoT) everywhere."""
    from .streaming_llada import TextDiffusionStreamer, end_token_ids

    return TextDiffusionStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, prefix=prefix,
                                 mask_token_id=model.config.get_text_config().mask_token_id,
                                 eos_token_ids=end_token_ids(tokenizer, model.generation_config))


def decode_answers(model, tokenizer, answers) -> list[str]:
    """The answers ([batch, length]) as text, each cut at its first end token (EOS / EoT)."""
    from .streaming_llada import end_token_ids, truncate_at_eos

    ends = end_token_ids(tokenizer, model.generation_config)
    return [text.strip() for text in tokenizer.batch_decode(truncate_at_eos(answers, ends), skip_special_tokens=True)]


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .visualization import decoding_order_png

    check_generation_args(args)
    if (args.stream or args.visualize) and len(args.prompt) != 1 and not args.join:
        raise CliError("--stream and --visualize show one answer: pass a single prompt (or --join the words).")
    images = load_images(args.image)
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, with_images=bool(images))
    tokenizer = text_tokenizer(processor)
    texts = [" ".join(args.prompt)] if args.join else list(args.prompt)
    if args.chat or is_vision_processor(processor):  # a vision model always takes its chat template
        inputs = chat_inputs(processor, [[user_message(text, images)] for text in texts], args.device)
    else:
        inputs = text_inputs(tokenizer, texts, args.device)
    kwargs = generation_kwargs(args)
    if args.stream:
        streamer = answer_streamer(model, tokenizer)
    else:
        streamer = StepProgress(planned_steps(model, kwargs), quiet=args.quiet)
    out = model.generate(**inputs, streamer=streamer,
                         generator=torch.Generator(device=args.device).manual_seed(args.seed),
                         return_dict_in_generate=True, **kwargs)
    answers = out.sequences[:, inputs["input_ids"].shape[1]:]
    if not args.stream:
        for text in decode_answers(model, tokenizer, answers):
            print(text)
    if args.visualize:
        tokens = [tokenizer.decode([t]) for t in answers[0].tolist()]
        decoding_order_png(args.visualize, out.commit_step[0].cpu(), tokens, title=" ".join(args.prompt)[:80])
        print(f"decoding order written to {args.visualize}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    import torch

    check_generation_args(args)
    images = load_images(args.image)  # shown with the first question
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, with_images=bool(images))
    tokenizer = text_tokenizer(processor)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chat with the model; an empty line or Ctrl-D ends it.", flush=True)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user or user in ("/exit", "/quit"):
            break
        first_question = not any(message["role"] == "user" for message in messages)
        messages.append(user_message(user, images if first_question else []))
        inputs = chat_inputs(processor, [messages], args.device)
        # The streamer prints "model> " itself: it redraws that line with every draft.
        out = model.generate(**inputs, streamer=answer_streamer(model, tokenizer, prefix="model> "),
                             generator=torch.Generator(device=args.device).manual_seed(args.seed),
                             **generation_kwargs(args))
        answer = decode_answers(model, tokenizer, out[:, inputs["input_ids"].shape[1]:])[0]
        messages.append({"role": "assistant", "content": answer})


# ---- train ---------------------------------------------------------------------------------------


def cmd_train(argv: list[str]) -> None:
    """`llada-hf train`: DiffusionSFTConfig fields as flags, a local dataset; works under `accelerate launch`.

    LLaDA-V folders train with their processor on image datasets; `--stage projector|instruct|reasoning` selects
    the stage preset and takes the official hyperparameters as defaults (any flag given overrides them)."""
    from dataclasses import dataclass, field

    from trl import TrlParser

    from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

    import llada_hf  # noqa: F401

    from .trainers import STAGE_PRESETS, DiffusionSFTConfig, DiffusionSFTTrainer, language_model_lora_config

    @dataclass
    class TrainScriptArguments:
        model_name_or_path: str = field(metadata={"help": "A saved model folder (or Hub id) to fine-tune."})
        dataset_path: str = field(metadata={"help": "A .json/.jsonl/.parquet file or a `save_to_disk` folder."})
        dataset_split: str = field(default="train", metadata={"help": "The split to train on."})
        use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
        lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
        lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})

    parser = TrlParser((TrainScriptArguments, DiffusionSFTConfig), prog="llada-hf train")
    stage = stage_in_argv(argv)
    if stage is not None:  # the official hyperparameters of the stage, as defaults
        parser.set_defaults(**STAGE_PRESETS[stage].official_args)
    script_args, training_args = parser.parse_args_and_config(argv)
    # Paths first (the dataset's is checked before it is read): a typo must not cost a model load
    check_model_path(script_args.model_name_or_path)
    dataset = load_local_dataset(script_args.dataset_path, script_args.dataset_split)
    vision = AutoConfig.from_pretrained(script_args.model_name_or_path).model_type == "llada_v"
    tokenizer = (AutoProcessor if vision else AutoTokenizer).from_pretrained(script_args.model_name_or_path)
    model = AutoModel.from_pretrained(script_args.model_name_or_path)
    peft_config = None
    if script_args.use_peft and vision:  # LoRA on the language model, the projector fully trained
        peft_config = language_model_lora_config(r=script_args.lora_r, lora_alpha=script_args.lora_alpha)
    elif script_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=script_args.lora_r, lora_alpha=script_args.lora_alpha, target_modules="all-linear")
    trainer = DiffusionSFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=peft_config)
    trainer.train()
    trainer.save_model()


def stage_in_argv(argv: list[str]) -> str | None:
    """The value of `--stage` (`--stage X` or `--stage=X`) when it names a preset; the parser judges the rest."""
    from .trainers.stages import STAGE_PRESETS

    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--stage=") else argv[index + 1] if (
            arg == "--stage" and index + 1 < len(argv)) else None
        if value in STAGE_PRESETS:
            return value
    return None


DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def check_dataset_path(path: str) -> None:
    """A `save_to_disk` folder, or an existing .json/.jsonl/.parquet file whose JSON parses."""
    if os.path.isdir(path):
        return
    extension = os.path.splitext(path)[1].lower()
    if extension not in DATASET_BUILDERS:
        raise CliError(f"--dataset_path {path!r}: use a .json, .jsonl or .parquet file or a datasets folder.")
    if not os.path.isfile(path):
        raise CliError(f"--dataset_path {path!r} does not exist.")
    if DATASET_BUILDERS[extension] == "json":
        check_json_records(path)


def check_json_records(path: str) -> None:
    """A JSON document, or JSON lines with one object per line, with at least one record; else name the file and
    the first bad line."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise CliError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8.") from None
    if not text.strip():
        raise CliError(f"{path} is empty: write one JSON record per line.")
    try:
        json.loads(text)  # a whole JSON document (datasets reads a list of records or a dict of columns)
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CliError(f"--dataset_path {path}: line {number} is not valid JSON ({error.msg}, column "
                           f"{error.colno}).") from None
        if not isinstance(record, dict):
            raise CliError(f"--dataset_path {path}: line {number} is a JSON {type(record).__name__}, not an object "
                           '({"prompt": ..., "completion": ...}).')


def load_local_dataset(path: str, split: str = "train"):
    """A datasets.Dataset from a .json/.jsonl/.parquet file or a `save_to_disk` folder (no download)."""
    from datasets import load_dataset, load_from_disk

    check_dataset_path(path)
    if os.path.isdir(path):
        data = load_from_disk(path)
        return data[split] if hasattr(data, "keys") and split in data else data
    builder = DATASET_BUILDERS[os.path.splitext(path)[1].lower()]
    dataset = load_dataset(builder, data_files={split: path}, split=split)
    return resolve_image_paths(dataset, os.path.dirname(os.path.abspath(path)))


IMAGE_COLUMNS = ("image", "images")  # TRL's vision formats


def resolve_image_paths(dataset, folder: str):
    """Image paths of a dataset file's rows (`image` / `images` columns: paths, or `{"bytes", "path"}` records as
    `datasets` writes them) read relative to the file's folder, as `datasets` reads the paths of an image folder's
    metadata.jsonl, not relative to where the command runs; absolute paths are kept. (A `datasets` Image column is
    left alone: its images are stored or resolved by `datasets`.)"""
    columns = [name for name in IMAGE_COLUMNS
               if name in dataset.column_names and not _decodes_images(dataset.features[name])]
    if not columns:
        return dataset
    return dataset.map(_resolve_row, fn_kwargs={"columns": columns, "folder": folder}, desc="Resolving image paths")


def _decodes_images(feature) -> bool:
    from datasets import Image

    if isinstance(feature, Image):
        return True
    if isinstance(feature, (list, tuple)):
        return any(_decodes_images(item) for item in feature)
    if isinstance(feature, dict):
        return any(_decodes_images(item) for item in feature.values())
    return hasattr(feature, "feature") and _decodes_images(feature.feature)  # List / Sequence


def _resolve_row(row: dict, columns: list[str], folder: str) -> dict:
    return {name: _resolve_path(row[name], folder) for name in columns}


def _resolve_path(value, folder: str):
    if isinstance(value, list):
        return [_resolve_path(item, folder) for item in value]
    if isinstance(value, dict) and not value.get("bytes"):
        return {**value, "path": _resolve_path(value.get("path"), folder)}
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.join(folder, value)
    return value


# ---- tune ----------------------------------------------------------------------------------------


def cmd_tune(args: argparse.Namespace) -> None:
    """Measure decoding settings on a dev set, print the accuracy / speed Pareto front, optionally save the best."""
    from .evaluation.tune import best_setting, front_table, plot_front, tune

    check_generation_args(args)
    check_json_records(args.dev)
    records = load_local_dataset(args.dev)
    if not {"prompt", "completion"} <= set(records.column_names):
        raise CliError(f"--dev {args.dev}: each record needs 'prompt' and 'completion' fields.")
    model, tokenizer = load_model_and_processor(args.model, args.dtype, args.device)
    results = tune(model, tokenizer, records["prompt"], records["completion"], max_new_tokens=args.max_new_tokens,
                   trials=args.trials, batch_size=args.batch_size, seed=args.seed)
    print(front_table(results))
    if args.plot:
        plot_front(results, args.plot)
    chosen = best_setting(results)
    print(f"chosen (fastest within 1 point of the best accuracy): {chosen.settings or 'the defaults'} — "
          f"{chosen.accuracy:.1f} %, {chosen.tokens_per_second:.1f} answer tokens/s")
    if args.save:
        model.generation_config.update(max_new_tokens=args.max_new_tokens, **chosen.settings)
        model.generation_config.save_pretrained(args.model)
        print(f"saved into {os.path.join(args.model, 'generation_config.json')}")


# ---- eval ----------------------------------------------------------------------------------------


def cmd_eval(argv: list[str]) -> None:
    """`llada-hf eval`: lm-evaluation-harness's own command line with the `llada_hf` model registered."""
    try:
        from lm_eval.__main__ import cli_evaluate

        from .evaluation import lm_eval_adapter  # noqa: F401  (registers the `llada_hf` model)
    except ImportError as error:
        raise CliError(f"`llada-hf eval` needs lm-eval: pip install -e '.[eval]' in the llada-hf checkout "
                       f"({error}).") from None
    if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
        argv = ["--model", "llada_hf", *argv]
    sys.argv = ["llada-hf eval", *argv]
    cli_evaluate()


# ---- publish -------------------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> None:
    from .hub_card import publish_folder

    result = publish_folder(args.path, args.repo_id, base_model=args.base_model,
                            private=True if args.private else None, dry_run=args.dry_run)
    print("\n".join(result.files))
    print(result.commit_url or "dry run: nothing was uploaded")


# ---- export --------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_checkpoint

    check_model_path(args.model)
    print(export_checkpoint(args.model, args.output, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                            ship_bundle=args.ship_bundle, tokenizer_pre=args.tokenizer_pre, code_repo=args.code_repo))


# ---- serve ---------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from .serving.server import run_from_args

    run_from_args(args)


# ---- demo ----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> None:
    if args.vision:
        from .demo_vision import DEFAULT_VISION, QUICK_VISION, run_vision_demo

        if args.large:
            raise CliError("--large has no vision variant: use `llada-hf demo --vision` or `--vision --quick`.")
        output_dir = "outputs/demo-vision" if args.output_dir == DEMO_OUTPUT_DIR else args.output_dir
        run_vision_demo(output_dir, seed=args.seed, settings=QUICK_VISION if args.quick else DEFAULT_VISION)
        return
    from .demo import DEFAULT, LARGE, QUICK, run_demo

    settings = QUICK if args.quick else LARGE if args.large else DEFAULT
    run_demo(args.output_dir, seed=args.seed, settings=settings)


if __name__ == "__main__":
    sys.exit(main())
