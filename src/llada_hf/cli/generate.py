"""`llada-hf generate MODEL PROMPT...`: one answer per prompt, printed or streamed, with a decoding-order picture."""

import argparse
import sys

from tqdm.auto import tqdm

from llada_hf_cli import CliError

from ..loading import (
    check_generation_args,
    generation_kwargs,
    is_vision_processor,
    load_model_and_processor,
    text_tokenizer,
)
from ..visualization import decoding_order_png
from .model_io import (
    answer_streamer,
    chat_inputs,
    decode_answers,
    load_images,
    seeded_generator,
    text_inputs,
    user_message,
)


def run(args: argparse.Namespace) -> None:
    """Answer each prompt (or the joined words); print the answers, or stream the single answer's drafts."""
    check_generation_args(args)
    if (args.stream or args.visualize) and len(args.prompt) != 1 and not args.join:
        raise CliError("--stream and --visualize show one answer: pass a single prompt (or --join the words).")
    images = load_images(args.image)
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, with_images=bool(images))
    tokenizer = text_tokenizer(processor)
    inputs = prompt_inputs(args, processor, images)
    kwargs = generation_kwargs(args)
    if args.stream:
        streamer = answer_streamer(model, tokenizer)
    else:
        streamer = StepProgress(planned_steps(model, kwargs), quiet=args.quiet)
    out = model.generate(**inputs, streamer=streamer, generator=seeded_generator(args.device, args.seed),
                         return_dict_in_generate=True, **kwargs)
    answers = out.sequences[:, inputs["input_ids"].shape[1]:]
    if not args.stream:
        for text in decode_answers(model, tokenizer, answers):
            print(text)
    if args.visualize:
        write_decoding_order(args.visualize, tokenizer, answers[0], out.commit_step[0], title=" ".join(args.prompt))


def prompt_inputs(args: argparse.Namespace, processor, images: list) -> dict:
    """The prompts as model inputs: through the chat template with `--chat` or for a vision model (which always
    takes it), else the texts as they are."""
    texts = [" ".join(args.prompt)] if args.join else list(args.prompt)
    if args.chat or is_vision_processor(processor):
        return chat_inputs(processor, [[user_message(text, images)] for text in texts], args.device)
    return text_inputs(text_tokenizer(processor), texts, args.device)


def write_decoding_order(path: str, tokenizer, answer, commit_step, title: str) -> None:
    """The picture of which answer position was committed at which step (`--visualize`)."""
    tokens = [tokenizer.decode([token]) for token in answer.tolist()]
    decoding_order_png(path, commit_step.cpu(), tokens, title=title[:80])
    print(f"decoding order written to {path}", file=sys.stderr)


class StepProgress:
    """A streamer that only advances a tqdm bar, once per denoising step (`generate` calls `put_draft` after each).

    Shown on stderr when it is a terminal; silent when piped or with `--quiet`.
    """

    def __init__(self, total_steps: int, quiet: bool):
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
