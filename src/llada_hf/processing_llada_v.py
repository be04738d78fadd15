"""LLaDA-V processor: the official image preprocessing, the LLaDA tokenizer with an image placeholder, and the
official chat format.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

Images go through transformers' LLaVA-OneVision image processor (its PIL backend: no torchvision needed) set up as
the official one: 384 px crops, mean = std = 0.5, bicubic resizing, the official grid pinpoints. For one image in
a prompt: the image squashed to one crop, then the crops of the image resized and zero-padded to the best grid
resolution (the official `process_anyres_image`). For several images in a prompt: each image padded to a square
with the mean colour and resized to one crop (what the official code does with several images). With
`vision_aspect_ratio="square"` (the official stage 1) only the first of these crops is kept: an image alone in its
prompt squashed to one crop, no grid. `geometry_llada_v.py` counts the crops and placeholders.
"""

import numpy as np
import torch
from PIL import Image

from transformers.image_utils import PILImageResampling
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from .configuration_llada_v import OFFICIAL_GRID
from .geometry_llada_v import SQUARE, ImageGeometry, max_num_patches


IMAGE_TOKEN = "<image>"

# The official `conv_llava_llada` system prompt.
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

# The official prompt: bos, the system prompt (unless the conversation has one), then per message
# `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` (content trimmed), then the assistant header.
# A content list renders `<image>\n` for each image item and the text of each text item, in order.
LLADA_V_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{%- set messages = [{'role': 'system', 'content': '" + SYSTEM_PROMPT + "'}] + messages -%}"
    "{%- endif -%}"
    "<|startoftext|>"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = ns.text -%}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)


def official_image_processor(crop_size: int = 384, pinpoints: list | None = None) -> LlavaOnevisionImageProcessorPil:
    """The official LLaDA-V image preprocessing (SigLIP crops of `crop_size`, mean = std = 0.5, bicubic)."""
    if not (isinstance(crop_size, int) and not isinstance(crop_size, bool) and crop_size > 0):
        raise ValueError(f"`crop_size` must be a positive number of pixels, got {crop_size!r}.")
    if pinpoints is not None and (not pinpoints or any(len(pair) != 2 or min(pair) <= 0 for pair in pinpoints)):
        raise ValueError(f"`pinpoints` must be a non-empty list of [height, width] resolutions (e.g. [[{crop_size}, "
                         f"{crop_size}]]), got {pinpoints!r}; None gives the official grid.")
    return LlavaOnevisionImageProcessorPil(
        size={"height": crop_size, "width": crop_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=PILImageResampling.BICUBIC,
        image_grid_pinpoints=pinpoints if pinpoints is not None else [list(pair) for pair in OFFICIAL_GRID],
        do_pad=True,
        do_convert_rgb=True,
    )


class LladaVProcessor(ProcessorMixin):
    r"""Image processor + LLaDA tokenizer + the official LLaDA-V chat template.

    The placeholder is `<image>`, added to the tokenizer as a special token when missing — as the official
    training code adds it — so with the official LLaDA tokenizer its id is 126349 (`LladaVConfig.image_token_id`).
    Each `<image>` in the text becomes as many placeholders as the image has features (base crop, unpadded grid,
    newlines), and the model puts the features there. Multi-image prompts and text-only prompts work.

    Differences from the official inference helper `tokenizer_image_token`, which splits the prompt at `<image>`
    and drops the first token of every later chunk (it expects a tokenizer that prepends BOS to each chunk; the
    LLaDA tokenizer does not): we keep that token — with the official prompt, the `\n` after the image — as the
    official training code does. The official template always ends with the assistant header; here it is added with
    `add_generation_prompt=True`, as transformers' chat templates do.

    Args:
        image_processor: a `LlavaOnevisionImageProcessorPil` (default: `official_image_processor()`).
        tokenizer: the LLaDA tokenizer.
        chat_template: default: the official LLaDA-V template (`LLADA_V_CHAT_TEMPLATE`).
        num_image_tokens: features per crop (official: (384 / 14)² = 729).
        vision_aspect_ratio: as `LladaVConfig.vision_aspect_ratio` (`"square"`: every image one crop, the official
            stage-1 packing).

    Example:
        ```python
        >>> from PIL import Image
        >>> from llada_hf.processing_llada_v import LladaVProcessor, official_image_processor
        >>> from llada_hf.tokenization import train_tokenizer
        >>> processor = LladaVProcessor(official_image_processor(28, [[28, 28], [28, 56], [56, 28]]),
        ...                             train_tokenizer(["a picture of a cat"], vocab_size=300), num_image_tokens=4)
        >>> messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (50, 28))},
        ...                                          {"type": "text", "text": "What is this?"}]}]
        >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
        ...                                        return_dict=True, return_tensors="pt")
        >>> inputs["pixel_values"].shape, int((inputs["input_ids"] == processor.image_token_id).sum())
        (torch.Size([1, 3, 3, 28, 28]), 14)
        ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_tokens: int = 729,
        vision_aspect_ratio: str = "anyres_max_4",
        **kwargs,
    ):
        image_processor = image_processor if image_processor is not None else official_image_processor()
        if tokenizer is not None and IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else None
        self.num_image_tokens = num_image_tokens
        self.vision_aspect_ratio = vision_aspect_ratio
        max_num_patches(vision_aspect_ratio)  # validates the value
        chat_template = chat_template if chat_template is not None else LLADA_V_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved processor; an official LLaDA-V folder has none (the official code builds its image
        processor in code), so it is built from the folder's config: crop size and patch of the vision tower, the
        anyres grid, the aspect-ratio mode, and the folder's tokenizer. The tokenizer's `<image>` id must be the
        config's `image_token_id`."""
        import os

        from transformers import AutoConfig, AutoTokenizer

        folder = str(pretrained_model_name_or_path)
        saved = ("processor_config.json", "preprocessor_config.json")
        if not os.path.isdir(folder) or any(os.path.isfile(os.path.join(folder, name)) for name in saved):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        loading = {key: kwargs[key] for key in ("trust_remote_code", "revision", "local_files_only") if key in kwargs}
        config = AutoConfig.from_pretrained(folder, **loading)
        tower = config.vision_config
        processor = cls(official_image_processor(tower.image_size, config.image_grid_pinpoints),
                        AutoTokenizer.from_pretrained(folder, **loading),
                        num_image_tokens=(tower.image_size // tower.patch_size) ** 2,
                        vision_aspect_ratio=config.vision_aspect_ratio)
        if processor.image_token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer in {folder} gives `<image>` the id {processor.image_token_id}, but the model config "
                f"expects {config.image_token_id} (`image_token_id`): use the model's own tokenizer, or set "
                "`image_token_id` in config.json to the tokenizer's id."
            )
        return processor

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Load the images (PIL images, paths, URLs) and bring them to RGB as the official loader does
        (`Image.convert("RGB")`: grayscale is replicated, alpha dropped, 16-bit values saturate at 255); refuse
        unreadable and empty images with a message that says what to pass."""
        try:
            images, text, videos, audio = super().prepare_inputs_layout(images, text, videos, audio, **kwargs)
        except OSError as error:  # PIL.UnidentifiedImageError: a corrupt file, or not an image at all
            raise ValueError(
                f"Cannot read an image ({error}). Pass PIL images, or paths / URLs of image files (PNG, JPEG, ...)."
            ) from error
        return (official_rgb(group_images(images, text)) if images is not None else None), text, videos, audio

    @property
    def image_geometry(self) -> ImageGeometry:
        """The crop and placeholder counts of this processor's images (the model's, for the matching config)."""
        return ImageGeometry(self.image_processor.size["height"], round(self.num_image_tokens**0.5),
                             self.image_processor.image_grid_pinpoints, self.vision_aspect_ratio)

    def _process_images(self, images, **kwargs):
        """As transformers' processors (the image processor, then each image's placeholders); under `"square"` each
        image keeps its first crop only: the image squashed when it is alone in its prompt, padded to a square among
        several (as the official training code, whatever its `image_aspect_ratio`). The anyres grid, never sent
        then, is limited to 1 x 1 crop so that it costs nothing."""
        if self.vision_aspect_ratio != SQUARE:
            return super()._process_images(images, **kwargs)
        crop = self.image_processor.size["height"]
        processed, replacements = super()._process_images(images, **{**kwargs, "image_grid_pinpoints": [[crop, crop]]})
        pixels = processed["pixel_values"]  # [images, crops, C, H, W]: a tensor, or a list of arrays
        processed["pixel_values"] = pixels[:, :1] if hasattr(pixels, "shape") else [crops[:1] for crops in pixels]
        return processed, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The placeholders of image `image_idx`: one per feature the model will put there."""
        counts = self.image_token_counts(image_inputs["image_sizes"], image_inputs["batch_num_images"])
        return self.image_token * counts[image_idx]

    def image_inputs(self, images: list) -> dict:
        """`pixel_values`, `image_sizes` and `batch_num_images` (tensors) of ONE prompt's images, packed as `__call__`
        packs them. With `image_token_counts`, for callers that tokenize the prompt themselves (one `<image>` per
        image) and expand each `<image>` into its placeholders (the server does, to keep message text as text)."""
        processed, _ = self._process_images([official_rgb(list(images))], return_tensors="pt")
        return {key: processed[key] for key in ("pixel_values", "image_sizes", "batch_num_images")}

    def image_token_counts(self, image_sizes, batch_num_images) -> list[int]:
        """The placeholders (= image features) of each image, from the processor's `image_sizes` and
        `batch_num_images`: what one `<image>` of the prompt becomes."""
        geometry = self.image_geometry
        layouts = geometry.layouts([int(n) for n in batch_num_images])
        sizes = [tuple(int(v) for v in (size.tolist() if hasattr(size, "tolist") else size)) for size in image_sizes]
        return [geometry.num_tokens(size, layout) for size, layout in zip(sizes, layouts)]


def group_images(images, text):
    """A flat list of images goes to the prompts in order, as many to each prompt as it has `<image>` placeholders:
    `images=[a, b]` with one prompt holding two `<image>` is that prompt's two images (as `[[a, b]]`), not two
    one-image prompts. One rule for both spellings, so the same prompt is packed the same way (several images in
    one prompt: one base crop each, as the official code)."""
    texts = [text] if isinstance(text, str) else text
    if not isinstance(images, (list, tuple)) or not texts or any(isinstance(i, (list, tuple)) for i in images):
        return images
    counts = [t.count(IMAGE_TOKEN) for t in texts]
    if sum(counts) != len(images):
        raise ValueError(f"The number of images ({len(images)}) differs from the `{IMAGE_TOKEN}` placeholders in the "
                         f"text ({sum(counts)}): give each image a placeholder, or pass a list of images per prompt.")
    grouped, start = [], 0
    for count in counts:
        grouped.append(list(images[start : start + count]))
        start += count
    return grouped


def official_rgb(images):
    """Every image of a (nested) list as the official loader has it: PIL images converted to RGB; arrays and
    tensors checked for emptiness and passed on (transformers reads their channels)."""
    if isinstance(images, (list, tuple)):
        return [official_rgb(image) for image in images]
    if isinstance(images, Image.Image):
        if min(images.size) == 0:
            raise ValueError(f"An image is empty ({images.width} x {images.height} pixels); pass a non-empty image.")
        return images.convert("RGB")
    if isinstance(images, (np.ndarray, torch.Tensor)) and 0 in tuple(images.shape):
        raise ValueError(f"An image array is empty (shape {tuple(images.shape)}); pass a non-empty image.")
    return images  # other types were refused by transformers' loader


__all__ = ["LladaVProcessor", "official_image_processor", "LLADA_V_CHAT_TEMPLATE"]
