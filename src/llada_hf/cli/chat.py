"""`llada-hf chat MODEL`: a multi-turn chat in the terminal, the drafts shown while the model denoises."""

import argparse

from ..loading import check_generation_args, generation_kwargs, load_model_and_processor, text_tokenizer
from .model_io import answer_streamer, chat_inputs, decode_answers, load_images, seeded_generator, user_message


END_WORDS = ("/exit", "/quit")


def run(args: argparse.Namespace) -> None:
    """Chat until an empty line, `/exit` or Ctrl-D; each answer stays in the conversation."""
    check_generation_args(args)
    images = load_images(args.image)  # shown with the first question
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, with_images=bool(images))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D ends it.", flush=True)
    while (question := read_question()) is not None:
        first_question = not any(message["role"] == "user" for message in messages)
        messages.append(user_message(question, images if first_question else []))
        messages.append({"role": "assistant", "content": answer(model, processor, messages, args)})


def read_question() -> str | None:
    """The user's next line, or None when they end the chat."""
    try:
        question = input("you> ").strip()
    except EOFError:
        return None
    return question if question and question not in END_WORDS else None


def answer(model, processor, messages: list[dict], args: argparse.Namespace) -> str:
    """The model's answer to the conversation, its drafts streamed meanwhile."""
    tokenizer = text_tokenizer(processor)
    inputs = chat_inputs(processor, [messages], args.device)
    # The streamer prints "model> " itself: it redraws that line with every draft.
    out = model.generate(**inputs, streamer=answer_streamer(model, tokenizer, prefix="model> "),
                         generator=seeded_generator(args.device, args.seed), **generation_kwargs(args))
    return decode_answers(model, tokenizer, out[:, inputs["input_ids"].shape[1]:])[0]
