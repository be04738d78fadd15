"""Model cards for LLaDA checkpoints: Hub metadata, a description, a usage snippet that runs, training and
evaluation summaries, citations.

A card describes one of three kinds of checkpoint:
- a full model (weights + config + the bundle's code; runs with `trust_remote_code=True`);
- a LoRA adapter, published as an adapter (loads on top of its base model with PEFT);
- a LoRA adapter merged into its base on publishing (`merge_adapter=True`): a full model again.

Each is a text model (`LladaForMaskedDiffusion`, pipeline tag text-generation) or a vision-language model
(`LladaVForConditionalGeneration`, LLaDA-V: pipeline tag image-text-to-text, published with its processor; its
snippet asks about an image).
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

import transformers
from transformers import GenerationConfig, PretrainedConfig

from ..configuration_llada import LladaConfig
from ..configuration_llada_v import LladaVConfig
from ..generation_llada import DiffusionGenerationConfig
from ..modeling_llada import BUNDLE_FILES, VISION_BUNDLE_FILES


TAGS = ["llada", "masked-diffusion"]
MODEL_TAGS = ["custom_code"]  # the repo carries the bundle's code; an adapter repo carries none
ADAPTER_TAGS = ["lora", "peft"]

# generation_config.json fields the usage snippet passes to `generate`, in this order, when the checkpoint
# sets them: the ones a reader most needs to see to understand (and change) how answers are produced.
SNIPPET_SETTINGS = ("max_new_tokens", "steps", "block_length", "remasking", "temperature", "cfg_scale")

SNIPPET_PROMPT = "Write a short poem about the sea."
SNIPPET_IMAGE_PROMPT = "What is in the image?"
SNIPPET_IMAGE_FILE = "photo.jpg"

# What `processor.save_pretrained` writes (LLaDA-V) and `AutoProcessor` reads.
PROCESSOR_FILE = "processor_config.json"

# The model types a card describes, and the config class that reads each from a saved folder.
CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    LladaConfig.model_type: LladaConfig,
    LladaVConfig.model_type: LladaVConfig,
}

LLADA_CITATION = """@article{nie2025large,
  title={Large Language Diffusion Models},
  author={Nie, Shen and Zhu, Fengqi and You, Zebin and Zhang, Xiaolu and Ou, Jingyang and Hu, Jun and Zhou, Jun and Lin, Yankai and Wen, Ji-Rong and Li, Chongxuan},
  journal={arXiv preprint arXiv:2502.09992},
  year={2025}
}"""  # noqa: E501  (a BibTeX entry is copied whole)

LLADA_V_CITATION = """@article{you2025llada,
  title={LLaDA-V: Large Language Diffusion Models with Visual Instruction Tuning},
  author={You, Zebin and Nie, Shen and Zhang, Xiaolu and Hu, Jun and Zhou, Jun and Lu, Zhiwu and Wen, Ji-Rong and Li, Chongxuan},
  journal={arXiv preprint arXiv:2505.16933},
  year={2025}
}"""  # noqa: E501


@dataclass(frozen=True)
class CheckpointFacts:
    """What a card says about a checkpoint, read from a model object or from a saved folder.

    Args:
        config: the model's (for an adapter: the base model's) config; `None` for an adapter folder,
            which does not contain its base model's config.
        generation_config: the settings `generate` uses by default, when known.
        lora: the PEFT config of the LoRA adapter, if the checkpoint is or was (merged) one.
        adapter_base: the base model the adapter was trained on, as PEFT recorded it (a Hub id or a path).
        is_adapter: published as an adapter (not merged into its base).
        has_chat_template: the tokenizer has a chat template (the snippet then uses it).
        base_in_official_layout: the (base) model was loaded from an official GSAI-ML checkpoint.
        has_processor: published with an image processor (LLaDA-V); tells a vision adapter folder, which holds no
            config, from a text one.
    """

    config: PretrainedConfig | None
    generation_config: GenerationConfig | None
    lora: Any | None
    adapter_base: str | None
    is_adapter: bool
    has_chat_template: bool
    base_in_official_layout: bool
    has_processor: bool = False

    @property
    def is_vision(self) -> bool:
        return getattr(self.config, "vision_config", None) is not None or self.has_processor

    @property
    def bundle_files(self) -> tuple[str, ...]:
        """The modeling code a full-model repo carries (the vision bundle on top of the text one for LLaDA-V)."""
        return BUNDLE_FILES + (VISION_BUNDLE_FILES if self.is_vision else ())


def render_model_card(
    model: Any,
    *,
    repo_id: str,
    tokenizer: Any = None,
    trainer: Any = None,
    base_model: str | None = None,
    merge_adapter: bool = False,
    license: str = "apache-2.0",
    datasets: str | Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    tags: Sequence[str] | None = None,
    description: str | None = None,
) -> ModelCard:
    """Render the Hub model card (README.md) of a LLaDA checkpoint that will live at `repo_id`.

    Args:
        model: a `LladaForMaskedDiffusion` or `LladaVForConditionalGeneration`, a PEFT model wrapping one (a LoRA
            adapter), or the path of a folder saved by `save_pretrained` (model or adapter).
        repo_id: "owner/name" on the Hub; the usage snippet loads the checkpoint from there.
        tokenizer: the tokenizer published with the model; with a chat template, the snippet uses it. For
            LLaDA-V, its processor (the snippet always uses the processor's chat template). Not needed when
            `model` is a folder (the folder's tokenizer files are read).
        trainer: a `transformers.Trainer` (e.g. `DiffusionSFTTrainer`), during or after training; its
            `state.log_history`, `args` and LoRA settings fill the "Training" section. Read only.
        base_model: Hub id of the model this one was fine-tuned from. Adapters default to the base PEFT
            recorded, and need one.
        merge_adapter: describe a PEFT `model` as it is published with `publish(..., merge_adapter=True)`:
            a full model fine-tuned from its base.
        license, datasets, tags: Hub metadata (`tags` are added to llada, masked-diffusion and custom_code,
            or lora and peft for an adapter).
        eval_results: `huggingface_hub.EvalResult`s; written to the metadata (model-index) and as a table.
        description: a paragraph of your own, placed after the generated description.

    Example:
        ```python
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.hub_card import render_model_card
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> card = render_model_card(LladaForMaskedDiffusion(config), repo_id="alice/tiny-llada")
        >>> card.data.library_name, card.data.pipeline_tag, card.data.tags
        ('transformers', 'text-generation', ['llada', 'masked-diffusion', 'custom_code'])
        >>> from llada_hf import LladaVConfig, LladaVForConditionalGeneration
        >>> vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...               image_size=28, patch_size=14, vision_use_head=False)
        >>> config_v = LladaVConfig(text_config=config, vision_config=vision, image_token_id=62,
        ...                         image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]])
        >>> card = render_model_card(LladaVForConditionalGeneration(config_v), repo_id="alice/tiny-llada-v")
        >>> card.data.pipeline_tag, "AutoModelForImageTextToText" in str(card)
        ('image-text-to-text', True)
        ```
    """
    check_repo_id(repo_id)
    if isinstance(model, (str, os.PathLike)):
        facts = facts_from_folder(model)
    else:
        facts = facts_from_model(model, tokenizer, merge_adapter=merge_adapter)
    base_model = resolve_base_model(base_model, facts)
    model_name = repo_id.split("/")[1]
    card_data = ModelCardData(
        library_name="peft" if facts.is_adapter else "transformers",
        pipeline_tag="image-text-to-text" if facts.is_vision else "text-generation",
        tags=TAGS + (ADAPTER_TAGS if facts.is_adapter else MODEL_TAGS) + list(tags or []),
        license=license,
        base_model=base_model,
        base_model_relation=("adapter" if facts.is_adapter else "finetune") if base_model else None,
        datasets=[datasets] if isinstance(datasets, str) else (list(datasets) if datasets else None),
        model_name=model_name if eval_results else None,
        eval_results=list(eval_results) if eval_results else None,
    )
    sections = [
        describe(facts, model_name, base_model, description),
        usage_section(facts, repo_id, base_model),
        training_section(trainer, datasets) if trainer is not None else "",
        evaluation_section(eval_results) if eval_results else "",
        citation_section(facts),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def check_repo_id(repo_id: str) -> None:
    """Refuse anything but an explicit "owner/name" Hub id (the snippet must say where the model lives)."""
    problem = None
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        problem = 'it must have the form "owner/name"'
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            problem = str(error)
    if problem:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {problem}. Example: 'your-username/llada-tiny-sft'.")


# --------------------------------------------------------------------------------------------------
# Facts about the checkpoint
# --------------------------------------------------------------------------------------------------


def facts_from_model(model: Any, tokenizer: Any, *, merge_adapter: bool = False) -> CheckpointFacts:
    """Facts of a `LladaForMaskedDiffusion` or of a PEFT model wrapping one."""
    lora = active_peft_config(model)
    if merge_adapter and lora is None:
        raise ValueError("`merge_adapter=True` needs a PEFT model (a LoRA adapter on a LLaDA model).")
    base = model.get_base_model() if lora is not None else model
    check_is_llada(getattr(base.config, "model_type", None))
    return CheckpointFacts(
        config=base.config,
        generation_config=getattr(base, "generation_config", None),
        lora=lora,
        adapter_base=getattr(lora, "base_model_name_or_path", None),
        is_adapter=lora is not None and not merge_adapter,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        # transformers records the weight renamings it applied while loading (official names -> ours)
        base_in_official_layout=bool(getattr(base, "_weight_conversions", None)),
        has_processor=hasattr(tokenizer, "image_processor"),
    )


def facts_from_folder(folder: str | os.PathLike) -> CheckpointFacts:
    """Facts of a folder written by `save_pretrained` (a LLaDA model, or a PEFT adapter) plus its tokenizer."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftConfig  # peft is only needed for adapters

        lora = PeftConfig.from_pretrained(folder)
        config, generation_config = None, None
    elif (folder / "config.json").is_file():
        lora = None
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        check_is_llada(model_type)
        config = CONFIG_CLASSES[model_type].from_pretrained(folder)
        has_generation_config = (folder / "generation_config.json").is_file()
        generation_config = DiffusionGenerationConfig.from_pretrained(folder) if has_generation_config else None
    else:
        raise ValueError(
            f"{folder} holds neither a model (config.json) nor an adapter (adapter_config.json); pass the folder "
            "written by `save_pretrained`."
        )
    return CheckpointFacts(
        config=config,
        generation_config=generation_config,
        lora=lora,
        adapter_base=getattr(lora, "base_model_name_or_path", None),
        is_adapter=lora is not None,
        has_chat_template=folder_has_chat_template(folder),
        base_in_official_layout=False,  # unknowable from an adapter folder
        has_processor=(folder / PROCESSOR_FILE).is_file(),
    )


def active_peft_config(model: Any) -> Any | None:
    """The LoRA config of the active adapter of a PEFT model; `None` for a plain model."""
    peft_configs = getattr(model, "peft_config", None)
    if not peft_configs or not hasattr(model, "get_base_model"):
        return None
    return peft_configs[model.active_adapter]


def check_is_llada(model_type: str | None) -> None:
    if model_type not in CONFIG_CLASSES:
        raise TypeError(
            f"Expected a LLaDA model (model_type 'llada', or 'llada_v' for LLaDA-V), got model_type {model_type!r}. "
            "llada_hf.hub_card publishes LLaDA checkpoints with their own modeling code."
        )


def folder_has_chat_template(folder: Path) -> bool:
    """transformers 5 saves the template as chat_template.jinja; older tokenizers kept it in tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    return tokenizer_config.is_file() and bool(json.loads(tokenizer_config.read_text()).get("chat_template"))


def is_hub_id(name: str | None) -> bool:
    """An "owner/name" Hub id, not a local path (PEFT records whatever the base was loaded from)."""
    if not name or name.count("/") != 1 or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_base_model(base_model: str | None, facts: CheckpointFacts) -> str | None:
    """The explicit `base_model`, else the Hub id PEFT recorded for an adapter; adapters must have a base
    whose own code the adapter fits."""
    if base_model is not None:
        check_repo_id(base_model)
    elif is_hub_id(facts.adapter_base):
        base_model = facts.adapter_base
    elif facts.is_adapter:
        raise ValueError(
            f"The adapter's base model was loaded from {facts.adapter_base!r}, which is not a Hub id; an adapter "
            "card must point at its base. Pass base_model='owner/name' (the Hub repo of the base model)."
        )
    if facts.is_adapter and facts.base_in_official_layout and base_model == facts.adapter_base:
        # Loaded with trust_remote_code=True, an official repo runs *its own* code, whose module names
        # (model.transformer.blocks.N.q_proj) are not the ones the adapter was trained on
        # (model.layers.N.self_attn.q_proj): PEFT would apply the adapter to nothing.
        raise ValueError(
            f"The adapter's base {base_model} is an official GSAI-ML checkpoint; its own remote code uses other "
            "module names, so the adapter would not apply there. Publish with merge_adapter=True, or publish the "
            "base with llada-hf first (publish(base, tokenizer, 'you/base-name')) and pass base_model='you/base-name'."
        )
    return base_model


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def describe(facts: CheckpointFacts, model_name: str, base_model: str | None, description: str | None) -> str:
    """Title, what the checkpoint is, and its architecture."""
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else None
    if facts.is_adapter:
        lora = facts.lora
        intro = (
            f"A LoRA adapter (r={lora.r}, alpha={lora.lora_alpha}, on {format_targets(lora.target_modules)}) for "
            f"{base_link}, a {family(facts)}. Load the base model with `trust_remote_code=True`, then apply this "
            "adapter with PEFT."
        )
    else:
        origin = f", fine-tuned from {base_link}" if base_link else ""
        vision = (
            " A SigLIP vision tower and an MLP projector turn each image into features that take the place of the "
            "image's tokens in the prompt."
            if facts.is_vision
            else ""
        )
        intro = (
            f"A {family(facts)}{origin}.{vision} "
            "Its Transformer attends in both directions; it writes an answer by starting from an all-masked "
            "answer and unmasking it over a number of denoising steps, not left to right.\n\n"
            f"The repository carries its own modeling code ({', '.join(f'`{name}`' for name in facts.bundle_files)}), "
            "so it runs with plain `transformers` and `trust_remote_code=True`."
        )
    parts = [f"# {model_name}", intro]
    if description:
        parts.append(description.strip())
    if facts.config is not None:
        parts.append(architecture_table(facts.config))
    return "\n\n".join(parts)


def family(facts: CheckpointFacts) -> str:
    """What kind of model the checkpoint is, with a link to its paper."""
    if facts.is_vision:
        return "vision-language masked diffusion model of the [LLaDA-V](https://arxiv.org/abs/2505.16933) family"
    return "masked diffusion language model of the [LLaDA](https://arxiv.org/abs/2502.09992) family"


def architecture_table(config: PretrainedConfig) -> str:
    """The language model's sizes (a LLaDA-V config's `text_config`), then the vision tower's, if any."""
    text = config.get_text_config()
    rows = [
        ("Layers", text.num_hidden_layers),
        ("Hidden size", text.hidden_size),
        ("Attention heads (key/value heads)", f"{text.num_attention_heads} ({text.num_key_value_heads})"),
        ("MLP hidden size", text.intermediate_size),
        ("Vocabulary (embedding rows)", text.vocab_size),
        ("Context length", text.max_position_embeddings),
        ("Tied embedding and LM head", "yes" if text.tie_word_embeddings else "no"),
        ("Mask token id", text.mask_token_id),
    ]
    vision = getattr(config, "vision_config", None)
    if isinstance(vision, PretrainedConfig):
        features = (vision.image_size // vision.patch_size) ** 2
        rows += [
            ("Vision tower", f"SigLIP: {vision.num_hidden_layers} layers, hidden size {vision.hidden_size}"),
            ("Image crops", f"{vision.image_size} px, patch {vision.patch_size}: {features} features per crop"),
            ("Crop grids (anyres)", f"{len(config.image_grid_pinpoints)} grids, `{config.vision_aspect_ratio}`"),
            ("Image token id", config.image_token_id),
        ]
    return "## Architecture\n\n" + markdown_table(("Setting", "Value"), rows)


def usage_section(facts: CheckpointFacts, repo_id: str, base_model: str | None) -> str:
    peft_note = ", `peft`" if facts.is_adapter else ""
    pillow_note = ", `pillow`" if facts.is_vision else ""
    settings_owner = "the base model's" if facts.is_adapter else "this checkpoint's"
    settings_note = (
        f" The `generate` arguments below are the ones saved in {settings_owner} `generation_config.json` "
        "(also its defaults); `steps` trades speed for quality, and `block_length` below `max_new_tokens` "
        "decodes the answer block by block, left to right."
        if facts.generation_config is not None
        else ""
    )
    return (
        f"## Usage\n\nNeeds `torch`, `transformers>={transformers.__version__}`{pillow_note}{peft_note}; not "
        f"`llada-hf`.{settings_note}\n\n```python\n{usage_snippet(facts, repo_id, base_model)}```"
    )


def usage_snippet(facts: CheckpointFacts, repo_id: str, base_model: str | None) -> str:
    """Python source that loads the published checkpoint and generates an answer to one prompt (for LLaDA-V:
    one question about an image file)."""
    if facts.is_vision:
        return f"{snippet_load_vision(facts, repo_id, base_model)}\n{snippet_ask_vision(facts)}"
    return f"{snippet_load_text(facts, repo_id, base_model)}\n{snippet_ask_text(facts)}"


def snippet_load_text(facts: CheckpointFacts, repo_id: str, base_model: str | None) -> str:
    if facts.is_adapter:
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModel, AutoTokenizer\n\n"
            f'adapter_id = "{repo_id}"\n'
            "tokenizer = AutoTokenizer.from_pretrained(adapter_id)\n"
            f'model = AutoModel.from_pretrained("{base_model}", trust_remote_code=True, dtype="auto")\n'
            "model = PeftModel.from_pretrained(model, adapter_id).eval()\n"
        )
    return (
        "from transformers import AutoModel, AutoTokenizer\n\n"
        f'model_id = "{repo_id}"\n'
        # config.json's auto_map points at the repo's code; AutoTokenizer reads it too
        "tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)\n"
        'model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype="auto").eval()\n'
    )


def snippet_load_vision(facts: CheckpointFacts, repo_id: str, base_model: str | None) -> str:
    """The processor's code lives in the model repo (an adapter repo has none: its base's is used)."""
    imports = "from PIL import Image\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
    if facts.is_adapter:
        return (
            "from peft import PeftModel\n"
            f"{imports}"
            f'base_id, adapter_id = "{base_model}", "{repo_id}"\n'
            "processor = AutoProcessor.from_pretrained(base_id, trust_remote_code=True)\n"
            'model = AutoModelForImageTextToText.from_pretrained(base_id, trust_remote_code=True, dtype="auto")\n'
            "model = PeftModel.from_pretrained(model, adapter_id).eval()\n"
        )
    return (
        f"{imports}"
        f'model_id = "{repo_id}"\n'
        "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)\n"
        'model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype="auto").eval()\n'
    )


def snippet_ask_text(facts: CheckpointFacts) -> str:
    if facts.has_chat_template:
        prompt = (
            f'messages = [{{"role": "user", "content": "{SNIPPET_PROMPT}"}}]\n'
            "inputs = tokenizer.apply_chat_template(\n"
            '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"\n'
            ")\n"
        )
    else:
        prompt = f'inputs = tokenizer("{SNIPPET_PROMPT}", return_tensors="pt")\n'
    arguments = ['inputs["input_ids"]', 'attention_mask=inputs["attention_mask"]']
    return (
        prompt
        + snippet_generate(arguments, facts)
        + 'answer = output[0, inputs["input_ids"].shape[1]:]  # generate returns prompt + answer\n'
        "print(tokenizer.decode(answer, skip_special_tokens=True))\n"
    )


def snippet_ask_vision(facts: CheckpointFacts) -> str:
    """LLaDA-V's prompt is the processor's chat template; the answer is cut at its first end token (EOS or
    `<|eot_id|>`: the official sampler never generates EOS inside an answer, so what follows the end of turn is
    filler)."""
    return (
        f'image = Image.open("{SNIPPET_IMAGE_FILE}")  # any picture\n'
        f'question = {{"type": "text", "text": "{SNIPPET_IMAGE_PROMPT}"}}\n'
        'messages = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]\n'
        "inputs = processor.apply_chat_template(\n"
        '    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"\n'
        ")\n"
        + snippet_generate(["**inputs"], facts)
        + 'answer = output[0, inputs["input_ids"].shape[1]:].tolist()  # generate returns prompt + answer\n'
        'ends = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")]\n'
        "answer = answer[: min([answer.index(end) for end in ends if end in answer], default=len(answer))]\n"
        "print(processor.decode(answer, skip_special_tokens=True))\n"
    )


def snippet_generate(arguments: list[str], facts: CheckpointFacts) -> str:
    """`output = model.generate(...)` with the inputs and the checkpoint's own settings, one per line."""
    settings = snippet_settings(facts.generation_config)
    arguments = arguments + [f"{name}={python_literal(value)}" for name, value in settings.items()]
    return "output = model.generate(\n" + "".join(f"    {argument},\n" for argument in arguments) + ")\n"


def snippet_settings(generation_config: GenerationConfig | None) -> dict[str, Any]:
    """The `SNIPPET_SETTINGS` the generation config sets (a remasking strategy object has no literal: skipped)."""
    if generation_config is None:
        return {}
    settings = {name: getattr(generation_config, name, None) for name in SNIPPET_SETTINGS}
    return {name: value for name, value in settings.items() if isinstance(value, (int, float, str))}


def python_literal(value: int | float | str) -> str:
    """`repr`, but strings in double quotes like the rest of the snippet."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def training_section(trainer: Any, datasets: str | Sequence[str] | None) -> str:
    """Hyperparameters and final logged metrics of a finished `transformers.Trainer` (duck-typed)."""
    args, state = trainer.args, trainer.state
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # an enum in TrainingArguments
    rows: list[tuple[str, Any]] = []
    if datasets:
        names = [datasets] if isinstance(datasets, str) else list(datasets)
        rows.append(("Datasets", ", ".join(f"[{name}](https://huggingface.co/datasets/{name})" for name in names)))
    train_dataset = getattr(trainer, "train_dataset", None)
    if train_dataset is not None and hasattr(train_dataset, "__len__"):
        rows.append(("Training examples", len(train_dataset)))
    rows += [
        ("Optimizer steps", state.global_step),
        ("Epochs", f"{state.epoch:.2f}" if state.epoch is not None else "-"),
        ("Learning rate", f"{args.learning_rate:g} ({scheduler} schedule)"),
        (
            "Batch size (per device × accumulation × devices)",
            f"{args.per_device_train_batch_size} × {args.gradient_accumulation_steps} × {args.world_size} = "
            f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size}",
        ),
    ]
    lora = active_peft_config(getattr(trainer, "model", None))
    if lora is not None:
        targets = format_targets(lora.target_modules)
        rows.append(("LoRA", f"r={lora.r}, alpha={lora.lora_alpha}, dropout={lora.lora_dropout}, on {targets}"))
    rows += [(f"Final `{key}`", f"{value:.4g}") for key, value in final_metrics(state.log_history).items()]
    versions = f"llada-hf {version('llada-hf')}, transformers {transformers.__version__}, torch {torch.__version__}"
    return f"## Training\n\nTrained with {versions}.\n\n" + markdown_table(("Setting", "Value"), rows)


def final_metrics(log_history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of the training loss, the evaluation loss and every accuracy metric.

    Accuracy is matched by name ("masked_accuracy", "eval_masked_accuracy", TRL's "mean_token_accuracy", ...)
    so that the card shows whatever accuracy the trainer logs.
    """
    final: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in ("loss", "eval_loss") or "accuracy" in key:
                final[key] = value
    return final


def evaluation_section(eval_results: Sequence[EvalResult]) -> str:
    rows = [
        (result.dataset_name, result.metric_name or result.metric_type, result.metric_value) for result in eval_results
    ]
    return "## Evaluation\n\n" + markdown_table(("Dataset", "Metric", "Value"), rows)


def citation_section(facts: CheckpointFacts) -> str:
    citations = [LLADA_CITATION] + ([LLADA_V_CITATION] if facts.is_vision else [])
    return "## Citation\n\n" + "\n\n".join(f"```bibtex\n{citation}\n```" for citation in citations)


def format_targets(target_modules: Any) -> str:
    if isinstance(target_modules, str):  # PEFT also accepts a regular expression
        return f"modules matching `{target_modules}`"
    return ", ".join(f"`{name}`" for name in sorted(target_modules))


def markdown_table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
