"""What `generate` and `chat` share: prompts (and their images) as model inputs, answers as text."""

import os

import torch
from PIL import Image

from llada_hf_cli import CliError

from ..decoding_llada import left_pad
from ..loading import is_vision_processor
from ..streaming_llada import TextDiffusionStreamer, end_token_ids, truncate_at_eos
from ..tokenization import chat_prompt_ids


def load_images(paths: list[str] | None) -> list:
    """The `--image` files as RGB-convertible PIL images; a missing or unreadable file is named (before any model
    is loaded)."""
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
    # special tokens come only from the template: text a user typed is text (`chat_prompt_ids`)
    ids, mask = left_pad([chat_prompt_ids(processor, messages) for messages in conversations], processor.pad_token_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def text_inputs(tokenizer, texts: list[str], device: str) -> dict:
    """`input_ids` and `attention_mask` of the texts as they are, left-padded."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def seeded_generator(device: str, seed: int) -> torch.Generator:
    """The random source of `--seed`: the same answers for the same seed."""
    return torch.Generator(device=device).manual_seed(seed)


def answer_streamer(model, tokenizer, prefix: str = "") -> TextDiffusionStreamer:
    """Live drafts on a terminal, the committed answer up to its end token (EOS / EoT) everywhere."""
    return TextDiffusionStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, prefix=prefix,
                                 mask_token_id=model.config.get_text_config().mask_token_id,
                                 eos_token_ids=end_token_ids(tokenizer, model.generation_config))


def decode_answers(model, tokenizer, answers) -> list[str]:
    """The answers ([batch, length]) as text, each cut at its first end token (EOS / EoT)."""
    ends = end_token_ids(tokenizer, model.generation_config)
    return [text.strip() for text in tokenizer.batch_decode(truncate_at_eos(answers, ends), skip_special_tokens=True)]
