"""Streamers for diffusion generation: committed text block by block, and the draft after every step.

Part of the model bundle: imports only torch and transformers, because it is copied next to every saved
checkpoint.
"""

import os

import torch

from transformers.generation.streamers import TextStreamer


def render_draft(ids: list[int], tokenizer, mask_token_id: int, mask_symbol: str = "░", **decode_kwargs) -> str:
    """Decode a partly masked answer: runs of decided tokens are decoded together, masks drawn as a symbol.

    Example:
        ```python
        >>> # render_draft([17, 95, 95, 23], tokenizer, mask_token_id=95)  ->  'the░░cat'
        ```
    """
    pieces, run = [], []
    for token in ids:
        if token == mask_token_id:
            if run:
                pieces.append(tokenizer.decode(run, **decode_kwargs))
                run = []
            pieces.append(mask_symbol)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.decode(run, **decode_kwargs))
    return "".join(pieces)


class TextDiffusionStreamer(TextStreamer):
    """A `TextStreamer` that also shows the draft answer after every denoising step.

    `generate` calls `put` with committed tokens block by block (as `TextStreamer` expects) and
    `put_draft(value=answer_ids)` after every step. Masked positions are drawn as `mask_symbol`.
    Override `on_draft_text` to send drafts elsewhere (a UI, a log).

    Example:
        ```python
        >>> from llada_hf.generation_llada import TextDiffusionStreamer
        >>> # streamer = TextDiffusionStreamer(tokenizer, skip_prompt=True)
        >>> # model.generate(input_ids, streamer=streamer, max_new_tokens=64)
        ```
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, mask_symbol: str = "░", mask_token_id: int | None = None,
                 **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        self.mask_symbol = mask_symbol
        self.mask_token_id = mask_token_id if mask_token_id is not None else tokenizer.mask_token_id
        self.drafts: list[str] = []

    def put_draft(self, value: torch.LongTensor, **kwargs) -> None:
        """Receive the current answer ([answer] or [1, answer]) with masks still in place."""
        ids = value[0] if value.dim() > 1 else value
        text = render_draft(ids.tolist(), self.tokenizer, self.mask_token_id, self.mask_symbol, **self.decode_kwargs)
        self.drafts.append(text)
        self.on_draft_text(text)

    def on_draft_text(self, text: str) -> None:
        """Redraw the draft on one terminal line (only when stdout is a terminal)."""
        if os.isatty(1):
            print("\r\x1b[K" + text.replace("\n", "⏎"), end="", flush=True)

    def end(self):
        if os.isatty(1) and self.drafts:
            print("\r\x1b[K", end="", flush=True)
        super().end()


__all__ = ["TextDiffusionStreamer", "render_draft"]
