"""The `llada-hf` command: demo, generate, chat, train, eval, publish, export, serve.

Every subcommand has `--help`. Errors are one line on stderr with what to change, and a non-zero exit code.
"""

import argparse
import json
import math
import os
import sys


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


# ---- generate and chat ---------------------------------------------------------------------------


# transformers' own generation fields offered as flags; the diffusion ones come from DIFFUSION_OPTIONS.
INHERITED_FLAGS = (("max_new_tokens", int), ("min_new_tokens", int), ("temperature", float), ("top_k", int),
                   ("top_p", float), ("min_p", float))


def generation_flags() -> list[tuple[str, type, tuple | None, str]]:
    """(name, type, choices, help) of every generation flag: transformers' fields above, then each diffusion
    setting of `DIFFUSION_OPTIONS` that has a CLI type, so a new option needs no change here."""
    from .generation_llada import DIFFUSION_OPTIONS, HONOURED_FIELDS

    flags = [(name, kind, None, HONOURED_FIELDS[name][1]) for name, kind in INHERITED_FLAGS]
    flags += [(option.name, option.cli_type, option.choices, option.help) for option in DIFFUSION_OPTIONS
              if option.cli_type is not None]
    return flags


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (defaults: the checkpoint's generation_config)")
    for name, kind, choices, help_text in generation_flags():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=choices, help=help_text.replace("%", "%%"))
    group.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help=", ".join(DTYPES))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_image_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--image", action="append", metavar="PATH", help=help_text)


def check_generation_args(args: argparse.Namespace) -> None:
    """Refuse, in one line, what `generate` would fail on deep inside: non-finite numbers, an unknown dtype, a
    device this machine does not have. Fills in the default device."""
    import torch

    for name in (name for name, kind, _, _ in generation_flags() if kind is float):
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
    names = [name for name, _, _, _ in generation_flags()]
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
    """The folder's `AutoProcessor`; for a folder without one (the official checkpoints ship only a tokenizer) the
    official LLaDA-V preprocessing, sized by the model config (crop size, grid pinpoints, features per crop)."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from .processing_llada_v import LladaVProcessor, official_image_processor

    try:
        return AutoProcessor.from_pretrained(path)
    except OSError:  # no processor_config.json / preprocessor_config.json
        config = AutoConfig.from_pretrained(path)
        vision = config.vision_config
        image_processor = official_image_processor(vision.image_size, config.image_grid_pinpoints)
        return LladaVProcessor(image_processor, AutoTokenizer.from_pretrained(path),
                               num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                               vision_aspect_ratio=config.vision_aspect_ratio)


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
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
             for messages in conversations]
    return text_inputs(processor, texts, device)


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
    """A JSON document, or JSON lines with one object per line; else name the first bad line."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
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
    return load_dataset(builder, data_files={split: path}, split=split)


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
        raise CliError(f"`llada-hf eval` needs lm-eval: pip install 'llada-hf[eval]' ({error}).") from None
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


DEMO_OUTPUT_DIR = "outputs/demo"


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


# ---- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada-hf", description="LLaDA masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the reversal experiment in miniature (the main job)")
    demo.add_argument("--output-dir", default=DEMO_OUTPUT_DIR)
    demo.add_argument("--seed", type=int, default=0)
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    size.add_argument("--large", action="store_true", help="a bigger run that shows the effect more strongly")
    demo.add_argument("--vision", action="store_true",
                      help="the LLaDA-V miniature instead: three training stages on pictures, beside an AR LLaVA")
    demo.set_defaults(func=cmd_demo)

    generate = sub.add_parser("generate", help="generate answers to prompts")
    generate.add_argument("model", help="a saved model folder")
    generate.add_argument("prompt", nargs="+", help="one or more prompts (one answer each)")
    generate.add_argument("--join", action="store_true", help="join the words into a single prompt")
    generate.add_argument("--chat", action="store_true",
                          help="apply the chat template to each prompt (always done for a vision model)")
    add_image_option(generate, "an image each prompt asks about (LLaDA-V models); repeat it for several images")
    generate.add_argument("--stream", action="store_true", help="show the drafts while denoising")
    generate.add_argument("--visualize", metavar="PNG", help="write the decoding-order picture here")
    generate.add_argument("--quiet", action="store_true", help="no progress bar (there is none when piped)")
    add_generation_options(generate)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal with live drafts")
    chat.add_argument("model", help="a saved model folder")
    chat.add_argument("--system", help="a system message")
    add_image_option(chat, "an image the first question is about (LLaDA-V models); repeat it for several images")
    add_generation_options(chat)
    chat.set_defaults(func=cmd_chat)

    tune = sub.add_parser("tune", help="measure decoding settings on a dev set: accuracy vs speed, save the best")
    tune.add_argument("model", help="a saved model folder")
    tune.add_argument("--dev", required=True, help="a JSON/JSONL file of {'prompt': ..., 'completion': ...} records")
    tune.add_argument("--max-new-tokens", type=int, default=64)
    tune.add_argument("--trials", type=int, default=12, help="settings to measure, the defaults included")
    tune.add_argument("--batch-size", type=int, default=8)
    tune.add_argument("--seed", type=int, default=0, help="which settings are drawn")
    tune.add_argument("--plot", metavar="PNG", help="draw accuracy against answer tokens/s here")
    tune.add_argument("--save", action="store_true", help="write the chosen setting into generation_config.json")
    tune.add_argument("--dtype", default="auto", help=", ".join(DTYPES))
    tune.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    tune.set_defaults(func=cmd_tune)

    publish = sub.add_parser("publish", help="upload a saved model or adapter folder to the Hub in one commit")
    publish.add_argument("path", help="a folder written by save_pretrained (model or LoRA adapter)")
    publish.add_argument("repo_id", help="owner/name on the Hub")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument("--dry-run", action="store_true", help="list the files and render the card; upload nothing")
    publish.add_argument("--base-model", help="Hub id of the base model (for adapters and fine-tunes)")
    publish.set_defaults(func=cmd_publish)

    export = sub.add_parser("export", help="write the official GSAI-ML layout or a GGUF file (llama.cpp)")
    export.add_argument("model", help="a saved model folder (or LoRA adapter folder, merged into its base)")
    export.add_argument("output", help="the folder (--format official) or file, e.g. model.gguf (--format gguf)")
    export.add_argument("--format", required=True, choices=["official", "gguf"])
    export.add_argument("--dtype", choices=["f16", "f32", "q8_0"], help="gguf: weight type (default f16)")
    export.add_argument("--tokenizer-pre", help="gguf: llama.cpp's pre-tokenizer name, when it cannot be detected")
    export.add_argument("--ship-bundle", action="store_true",
                        help="official: auto_map points at llada-hf's code, copied beside the weights")
    export.add_argument("--code-repo", help="official: Hub repo of the official code (GSAI-ML/LLaDA-8B-Instruct)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.set_defaults(func=cmd_export)

    serve = sub.add_parser("serve", help="an OpenAI-compatible server: step-level batching, streamed drafts, a web "
                                         "page (generation flags: the defaults of every request)")
    serve.add_argument("model", help="a saved model folder")
    from .serving.server import add_serve_options

    add_serve_options(serve)
    add_generation_options(serve)
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="fine-tune with DiffusionSFTTrainer (flags: DiffusionSFTConfig fields)",
                           add_help=False)
    train.set_defaults(func=None)
    sub.add_parser("eval", help="lm-evaluation-harness with the llada_hf model (flags: lm_eval's)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in ("train", "eval"):  # these parse their own flags (TRL's / lm_eval's parser)
            (cmd_train if argv[0] == "train" else cmd_eval)(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        args.func(args)
        return 0
    except (CliError, ValueError, TypeError, OSError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"llada-hf: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
