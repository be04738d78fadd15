"""Vision-language batches for masked-diffusion training (LLaDA-V): images in, text collated as for LLaDA.

TRL's vision dataset formats: `"images"` (a list) or `"image"` (one) beside `"messages"` (split by the trainer into
one prompt-completion example per assistant turn) or `"prompt"` / `"completion"` (conversational or plain strings
with `<image>` placeholders). Images are loaded and converted here, then the processor renders and tokenizes the
prompt (one `<image>` becomes the image's feature placeholders); the answer is tokenized alone and the rows are
padded by the text collator, `DataCollatorForMaskedDiffusion`, so the answers are padded with scored EOS tokens
exactly as for text. Only answer tokens are maskable: never the prompt, never an image placeholder. The batch says
how its images were packed (`vision_aspect_ratio`), and the model packs them so.
"""

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

from transformers import ProcessorMixin
from transformers.data.data_collator import DataCollatorMixin

from ..geometry_llada_v import max_num_patches
from .collator import DataCollatorForMaskedDiffusion


# The processor's outputs that describe the images, and how they are packed (passed to the model beside `input_ids`)
IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "batch_num_images", "vision_aspect_ratio")
# The packing of images under the `"plain"` template: the official stage 1 keeps its script's defaults
# (`image_aspect_ratio = "square"`, `mm_patch_merge_type = "flat"`): each image one crop (squashed), no newline
PLAIN_TEMPLATE_PACKING = "square"


def is_vision_example(example: dict[str, Any]) -> bool:
    """Whether a dataset row is in one of TRL's vision formats (an `"image"` or `"images"` column)."""
    return "image" in example or "images" in example


def load_image(image: Any) -> Image.Image:
    """One image of a row as an RGB PIL image: a PIL image, a file path, or a `datasets` `{"bytes", "path"}` dict.

    A missing image, an unreadable file and a mode PIL cannot convert to RGB are `ValueError`s that say so.
    """
    if image is None:
        raise ValueError("An example has a missing image (None). Drop the row, or give it its image.")
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # a `datasets` Image column, not decoded
        import io

        image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else image.get("path")
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ValueError(f"An example's image file does not exist: {str(image)!r}.")
        try:
            image = Image.open(image)
            image.load()
        except OSError as error:
            raise ValueError(f"Cannot read an example's image file ({error}); pass PNG, JPEG, ... files.") from None
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"An example's image is a {type(image).__name__}; pass PIL images, image file paths or a `datasets` "
            "Image column."
        )
    if min(image.size) == 0:
        raise ValueError(f"An example's image is empty ({image.width} x {image.height} pixels); drop the row or give "
                         "it a real image.")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(
            f"An example's image has mode {image.mode!r}, which cannot be converted to RGB ({error}). Convert it "
            "first (e.g. `image.convert('RGBA')`)."
        ) from None


def example_images(example: dict[str, Any]) -> list[Image.Image]:
    """The row's images (`"images"`: a list; `"image"`: one), loaded and converted to RGB."""
    images = example["images"] if "images" in example else [example["image"]]
    if images is None:
        images = [None]
    return [load_image(image) for image in images]


def message_text(messages: list[dict[str, Any]] | str) -> str:
    """The text of a completion: a string, or the text parts of its messages."""
    if isinstance(messages, str):
        return messages
    parts = []
    for message in messages:
        content = message.get("content") or ""
        parts += [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]
    return "".join(parts)


def render_example(example: dict[str, Any], images: list, processor: ProcessorMixin, template: str) -> tuple[str, str]:
    """(prompt text with one `<image>` per image, answer text) of a prompt-completion row.

    `"chat"`: conversational rows go through the processor's chat template (TRL puts the images of string contents
    before the first user message); string rows are used as they are. `"plain"` (stage 1, official `llada_plain`):
    the prompt is the images alone, the answer is the completion's text and a newline (no EOS: the official
    `preprocess_plain` appends none; EOS comes only as padding); the user's text is dropped.
    """
    if template == "plain":
        return processor.image_token * len(images), message_text(example["completion"]) + "\n"
    if not is_conversational(example):
        return example["prompt"], example["completion"]
    messages = {
        "prompt": prepare_multimodal_messages(example["prompt"], images=images),
        "completion": prepare_multimodal_messages(example["completion"]),
    }
    rendered = apply_chat_template(messages, processor)
    return rendered["prompt"], rendered["completion"]


@dataclass
class DataCollatorForVisionMaskedDiffusion(DataCollatorMixin):
    """Batches of image + text rows for [`DiffusionSFTTrainer`] on LLaDA-V.

    Per row: load the images, render the prompt (`prompt_template`), check that it holds one `<image>` per image,
    tokenize it with the processor (which expands each `<image>` into the image's feature placeholders), tokenize
    the answer (plain-string answers of the chat template get EOS appended, as TRL does for text), truncate the
    answer to `max_length`. Then the text collator pads the rows (answers with scored EOS when
    `pad_answers_with_eos`) and marks the answer as the only maskable part; the processor's `pixel_values`,
    `image_sizes` and `batch_num_images` join the batch, with the `vision_aspect_ratio` they were packed with.

    Args:
        processor: a `LladaVProcessor`.
        pad_answers_with_eos, pad_to_multiple_of: as for `DataCollatorForMaskedDiffusion`.
        prompt_template: `"chat"` (the processor's chat template) or `"plain"` (the official stage-1 captions).
        max_length: longest row in tokens, image placeholders included; longer answers are cut.
        vision_aspect_ratio: how images are packed. `None`: `"square"` with the `"plain"` template (the official
            stage 1: each image one crop, squashed, no anyres grid, no `image_newline`), else the processor's.

    Example:
        ```python
        >>> from PIL import Image
        >>> from llada_hf.processing_llada_v import LladaVProcessor, official_image_processor
        >>> from llada_hf.tokenization import train_tokenizer
        >>> from llada_hf.trainers.vision import DataCollatorForVisionMaskedDiffusion
        >>> processor = LladaVProcessor(official_image_processor(28, [[28, 28]]),
        ...                             train_tokenizer(["a red square"], vocab_size=280), num_image_tokens=4)
        >>> collator = DataCollatorForVisionMaskedDiffusion(processor, prompt_template="plain")
        >>> batch = collator([{"image": Image.new("RGB", (28, 28), "red"), "prompt": "",
        ...                    "completion": "a red square"}])
        >>> batch["pixel_values"].shape, batch["vision_aspect_ratio"]  # the plain template: one squashed crop
        (torch.Size([1, 1, 3, 28, 28]), 'square')
        >>> processor.tokenizer.decode(batch["input_ids"][0, 4:])  # 4 image features, then the caption: no EOS
        'a red square\\n'
        >>> bool((batch["labels"][batch["input_ids"] == processor.image_token_id] == -100).all())  # never masked
        True
        ```
    """

    processor: ProcessorMixin
    pad_answers_with_eos: bool = True
    prompt_template: str = "chat"
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    vision_aspect_ratio: str | None = None
    _text_collator: DataCollatorForMaskedDiffusion = field(init=False, repr=False)
    _packing_processor: ProcessorMixin = field(init=False, repr=False)

    def __post_init__(self):
        if self.prompt_template not in ("chat", "plain"):
            raise ValueError(f"`prompt_template` must be 'chat' or 'plain', got {self.prompt_template!r}.")
        if self.vision_aspect_ratio is None and self.prompt_template == "plain":
            self.vision_aspect_ratio = PLAIN_TEMPLATE_PACKING
        self._packing_processor = with_packing(self.processor, self.vision_aspect_ratio)
        tokenizer = self.processor.tokenizer
        self._text_collator = DataCollatorForMaskedDiffusion(
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_answers_with_eos=self.pad_answers_with_eos,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [example_images(example) for example in examples]
        texts = [self._render(example, row_images) for example, row_images in zip(examples, images)]
        prompts = self._packing_processor(
            images=images if any(images) else None,
            text=[prompt for prompt, _ in texts],
            padding=True,
            padding_side="right",
            return_tensors="pt",
            add_special_tokens=False,  # the chat template writes BOS itself
        )
        rows = []
        for row, (_, answer) in enumerate(texts):
            prompt_ids = prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist()
            rows.append(self._row(prompt_ids, self._answer_ids(answer, examples[row])))
        batch = self._text_collator(rows)
        if "pixel_values" in prompts:
            batch.update({key: prompts[key] for key in IMAGE_INPUT_KEYS if key in prompts})
            batch["vision_aspect_ratio"] = self._packing_processor.vision_aspect_ratio
        return batch

    def _render(self, example: dict[str, Any], images: list) -> tuple[str, str]:
        if "prompt" not in example or "completion" not in example:
            raise ValueError(
                f"A vision example has the columns {sorted(example)}; DiffusionSFTTrainer trains LLaDA-V on "
                "'images'/'image' with 'messages' or with 'prompt' + 'completion' (for captions, use "
                "`prompt_template='plain'` with the caption as the completion)."
            )
        prompt, answer = render_example(example, images, self.processor, self.prompt_template)
        placeholders = prompt.count(self.processor.image_token)
        if placeholders != len(images):
            raise ValueError(
                f"An example's prompt has {placeholders} image placeholders ({self.processor.image_token!r}) but "
                f"{len(images)} images: give one placeholder per image (conversational rows get theirs from TRL, "
                f"before the first user message). Prompt: {prompt[:200]!r}"
            )
        return prompt, answer

    def _answer_ids(self, answer: str, example: dict[str, Any]) -> list[int]:
        tokenizer = self.processor.tokenizer
        if self.prompt_template == "chat" and not is_conversational(example):  # as TRL's `add_eos`
            answer = answer if answer.endswith(tokenizer.eos_token) else answer + tokenizer.eos_token
        return tokenizer(answer, add_special_tokens=False)["input_ids"]

    def _row(self, prompt_ids: list[int], answer_ids: list[int]) -> dict[str, list[int]]:
        if self.max_length is not None:
            room = self.max_length - len(prompt_ids)
            if room <= 0:
                raise ValueError(
                    f"An example's prompt is {len(prompt_ids)} tokens long (image placeholders included), which "
                    f"leaves no answer token within `max_length={self.max_length}`. Raise `max_length`, or use "
                    "smaller images or a shorter prompt."
                )
            answer_ids = answer_ids[:room]
        return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def with_packing(processor: ProcessorMixin, vision_aspect_ratio: str | None) -> ProcessorMixin:
    """`processor`, or a shallow copy of it (same tokenizer and image processor) that packs images with
    `vision_aspect_ratio`; the processor passed in is left as it is."""
    if vision_aspect_ratio is None or vision_aspect_ratio == processor.vision_aspect_ratio:
        return processor
    max_num_patches(vision_aspect_ratio)  # validates the value now, not at the first batch
    packing = copy.copy(processor)
    packing.vision_aspect_ratio = vision_aspect_ratio
    return packing


def repeat_image_inputs(inputs: dict[str, Any], copies: int) -> dict[str, Any]:
    """The image inputs of a batch whose rows are each repeated `copies` times (`repeat_interleave`): each row's
    images are repeated with it. Empty when the batch has no images.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.trainers.vision import repeat_image_inputs
        >>> inputs = {"pixel_values": torch.arange(3.0), "image_sizes": torch.tensor([[1, 1], [2, 2], [3, 3]]),
        ...           "batch_num_images": torch.tensor([1, 2])}
        >>> repeat_image_inputs(inputs, 2)["pixel_values"].tolist()  # row 0: image 0; row 1: images 1 and 2
        [0.0, 0.0, 1.0, 2.0, 1.0, 2.0]
        ```
    """
    image_inputs = {key: inputs[key] for key in IMAGE_INPUT_KEYS if inputs.get(key) is not None}
    if copies == 1 or "pixel_values" not in image_inputs:
        return image_inputs
    per_row = torch.as_tensor(image_inputs["batch_num_images"]).tolist()
    starts = [sum(per_row[:row]) for row in range(len(per_row))]
    index = [start + i for start, count in zip(starts, per_row) for _ in range(copies) for i in range(count)]
    index = torch.tensor(index, dtype=torch.long)
    repeated = {key: image_inputs[key][index.to(image_inputs[key].device)] for key in ("pixel_values", "image_sizes")}
    repeated["batch_num_images"] = torch.as_tensor(per_row).repeat_interleave(copies)
    return {**image_inputs, **repeated}


def keep_frozen_tower_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store LLaDA-V's vision tower in `dtype` (e.g. bfloat16) while the rest keeps its own; the tower must be frozen.

    SigLIP casts the pixels to its own dtype; a hook casts the tower's features to the projector's dtype.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tower, projector = base.model.vision_tower, base.model.multi_modal_projector
    if any(parameter.requires_grad for parameter in tower.parameters()):
        raise ValueError(
            "`vision_tower_dtype` keeps a *frozen* vision tower in a lower precision, but the tower trains here. Use "
            "`stage='projector'` (or freeze the tower, or leave `vision_tower_dtype` unset)."
        )
    tower.to(dtype)
    if not getattr(projector, "_llada_casts_input", False):
        projector.register_forward_pre_hook(_cast_to_projector_dtype)
        projector._llada_casts_input = True


def _cast_to_projector_dtype(projector: torch.nn.Module, args: tuple) -> tuple:
    dtype = projector.linear_1.weight.dtype
    return tuple(arg.to(dtype) if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)


def is_llada_v_config(config) -> bool:
    """Whether a model config is LLaDA-V's (a vision tower beside the language model)."""
    return getattr(config, "model_type", None) == "llada_v" or getattr(config, "vision_config", None) is not None


def check_vision_training(config, processing_class, vision_dataset: bool, stage: str | None) -> None:
    """Refuse, before anything is prepared, an image dataset for a text-only model, an image dataset without a
    processor, and a LLaDA-V stage preset for a text-only model."""
    llada_v = is_llada_v_config(config)
    if vision_dataset and not llada_v:
        raise TypeError(
            f"The dataset has images ('image' / 'images' column), but the model is a text-only "
            f"{getattr(config, 'model_type', type(config).__name__)!r} model. Images train LLaDA-V "
            "(`LladaVForConditionalGeneration` with its `LladaVProcessor`); for this model, drop the image column."
        )
    if stage is not None and not llada_v:
        raise ValueError(
            f"`stage={stage!r}` is a LLaDA-V training stage (vision tower, projector, language model), but the model "
            f"is a text-only {getattr(config, 'model_type', '')!r} model. Use `LladaVForConditionalGeneration`, or "
            "leave `stage` unset."
        )
    if vision_dataset and not hasattr(processing_class, "image_token"):
        raise TypeError(
            f"The dataset has images, but `processing_class` is a {type(processing_class).__name__}: pass the "
            "model's `LladaVProcessor` (it turns images into pixels and `<image>` into feature placeholders)."
        )


# The language model's linear layers of LLaDA-V (PEFT matches a string `target_modules` against whole module names)
LANGUAGE_MODEL_LINEAR_LAYERS = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def language_model_lora_config(r: int = 16, lora_alpha: int = 32, **kwargs):
    """A `peft.LoraConfig` for LLaDA-V: LoRA on the language model's linear layers, the projector fully trained
    (`modules_to_save`, saved whole beside the adapter), the vision tower frozen.

    Example:
        ```python
        >>> from llada_hf.trainers.vision import language_model_lora_config
        >>> config = language_model_lora_config(r=8)
        >>> config.r, sorted(config.modules_to_save)
        (8, ['multi_modal_projector'])
        ```
    """
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=LANGUAGE_MODEL_LINEAR_LAYERS,
                      modules_to_save=["multi_modal_projector"], **kwargs)
