"""Streamers for diffusion generation (committed text block by block, the draft after every step), and the cut of
an answer at its first end token.

Part of the model bundle: imports only torch and transformers, because it is copied next to every saved
checkpoint.
"""

import math
import shutil
import sys
import time
import unicodedata
from collections.abc import Collection, Sequence

import torch

from transformers.generation.streamers import TextDiffusionStreamer as TransformersTextDiffusionStreamer


# LLaDA's end-of-turn token: a chat answer ends with it (then EOS padding), as a plain answer ends with EOS.
EOT_TOKEN = "<|eot_id|>"


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple, set)) else [int(value)]


def end_token_ids(tokenizer=None, generation_config=None) -> list[int]:
    """The ids that end an answer: EOS and EoT of the generation config and of the tokenizer.

    Example:
        ```python
        >>> from llada_hf.streaming_llada import end_token_ids
        >>> # end_token_ids(tokenizer, model.generation_config)  ->  [126081, 126348] for LLaDA-8B-Instruct
        ```
    """
    ids = []
    if generation_config is not None:
        ids += _id_list(generation_config.eos_token_id) + _id_list(getattr(generation_config, "eot_token_id", None))
    if tokenizer is not None:
        ids += _id_list(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        ids += _id_list(vocab.get(EOT_TOKEN))
    return sorted(set(ids))


def answer_end(ids: Sequence[int], eos_token_ids: Collection[int]) -> int:
    """Where the answer in `ids` ends: the position of its first end token (EOS / EoT), or `len(ids)` when it holds
    none. `generate` fills every answer position, so what comes after the first end token is not part of the answer;
    every cut of an answer (`truncate_at_eos`, `TextDiffusionStreamer`, `llada-hf serve`) asks this function.

    Example:
        ```python
        >>> from llada_hf.streaming_llada import answer_end
        >>> answer_end([5, 6, 1, 7], eos_token_ids={1, 2}), answer_end([8, 9], eos_token_ids={1, 2})
        (2, 2)
        ```
    """
    return next((position for position, token in enumerate(ids) if token in eos_token_ids), len(ids))


def truncate_at_eos(sequences, eos_token_ids) -> list[list[int]]:
    """Each answer up to (not including) its first end token: what was committed after it is not part of it.

    `generate` fills every answer position, so a decoded answer can go on after its EOS / EoT; cut it here
    before decoding. `sequences` is a batch: a [batch, length] tensor or a list of token-id lists (pass only the
    answer part, `out[:, prompt_length:]`, since a chat prompt holds EoT tokens of earlier turns).

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import truncate_at_eos
        >>> truncate_at_eos(torch.tensor([[5, 6, 1, 7], [8, 9, 9, 9]]), eos_token_ids=[1, 2])
        [[5, 6], [8, 9, 9, 9]]
        ```
    """
    rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(row) for row in sequences]
    if any(not isinstance(row, list) for row in rows):
        raise TypeError("truncate_at_eos takes a batch of sequences ([batch, length]); wrap a single one: [ids].")
    ends = set(_id_list(eos_token_ids))
    return [row[: answer_end(row, ends)] for row in rows]


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


# ---- drawing on a terminal ---------------------------------------------------------------------------


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def _display_width(text: str) -> int:
    return sum(_char_width(char) for char in text)


def _one_line(text: str) -> str:
    """A draft on one logical line: newlines shown as ⏎, other control characters as spaces (so its width on
    the screen is known)."""
    return "".join("⏎" if char == "\n" else " " if unicodedata.category(char).startswith("C") else char
                   for char in text)


def _fit(text: str, width: int) -> str:
    """`text`, or its tail after "…", in at most `width` columns (a draft must never scroll the screen)."""
    if _display_width(text) <= width:
        return text
    kept, used = [], 1
    for char in reversed(text):
        used += _char_width(char)
        if used > width:
            break
        kept.append(char)
    return "…" + "".join(reversed(kept))


def _rows_above_cursor(width: int, columns: int) -> int:
    """Rows a one-line text of `width` columns took above the row the cursor ends on (terminals wrap lazily:
    a text that exactly fills k rows leaves the cursor on row k)."""
    return max(math.ceil(width / columns), 1) - 1


class TextDiffusionStreamer(TransformersTextDiffusionStreamer):
    """transformers' `TextDiffusionStreamer` for LLaDA: committed text block by block, the draft after every step.

    Same protocol as transformers' class (`put(value)`, `put_draft(value, **kwargs)`, `end()`), so `generate`
    accepts either. `generate` calls `put` with the prompt, then with each committed block, and
    `put_draft(value=canvas_ids)` after every step with the canvas: the answer from the block being decoded on,
    masks still in place (what `put` has not had yet, so transformers' class, which prints the draft after the
    committed text, shows each piece once). This class shows the whole answer in its drafts (the committed blocks,
    then the canvas); masked positions are drawn as `mask_symbol`. Every draft is kept in `self.drafts`; override
    `on_draft_text` to send drafts elsewhere (a UI, a log) and `on_finalized_text` for the committed text, as with
    `TextStreamer`.

    On a terminal (`live`, default: whether stdout is one) the draft is redrawn in place under `prefix` (e.g.
    "model> "), clipped to the screen, and the final answer replaces it and stays. Elsewhere (a pipe, a file) the
    committed text is printed as it comes, after `prefix`, like `TextStreamer`. The text starts at the beginning of
    a line.

    Args:
        tokenizer: decodes the tokens.
        skip_prompt: do not show the prompt.
        mask_symbol: drawn for each masked position of a draft.
        mask_token_id: the mask id (default: `tokenizer.mask_token_id`).
        eos_token_ids: show the answer only up to its first end token (e.g. `end_token_ids(tokenizer,
            model.generation_config)`); default: show everything `generate` returns.
        prefix: printed before the answer, and kept when a draft is redrawn.
        live: redraw drafts in place (default: stdout is a terminal).
        sleep_time: seconds to wait after each draft (to watch it denoise).
        decode_kwargs: passed to `tokenizer.decode` (e.g. `skip_special_tokens=True`).

    Example:
        ```python
        >>> from llada_hf import TextDiffusionStreamer
        >>> # streamer = TextDiffusionStreamer(tokenizer, skip_prompt=True, prefix="model> ")
        >>> # model.generate(input_ids, streamer=streamer, max_new_tokens=64)
        ```
    """

    def __init__(
        self,
        tokenizer,
        skip_prompt: bool = False,
        mask_symbol: str = "░",
        mask_token_id: int | None = None,
        eos_token_ids: int | list[int] | None = None,
        prefix: str = "",
        live: bool | None = None,
        sleep_time: float | None = None,
        **decode_kwargs,
    ):
        super().__init__(tokenizer, skip_prompt=skip_prompt, sleep_time=sleep_time, **decode_kwargs)
        self.mask_symbol = mask_symbol
        self.mask_token_id = mask_token_id if mask_token_id is not None else tokenizer.mask_token_id
        if self.mask_token_id is None:
            raise ValueError(
                "TextDiffusionStreamer needs the mask token id to draw drafts: pass "
                "`mask_token_id=model.config.mask_token_id`, or set `tokenizer.mask_token = '<|mdm_mask|>'`."
            )
        self.eos_token_ids = None if eos_token_ids is None else set(_id_list(eos_token_ids))
        self.prefix = prefix
        self.live = sys.stdout.isatty() if live is None else live
        self.drafts: list[str] = []
        self._reset_answer()

    def _reset_answer(self) -> None:
        self._awaiting_prompt = True  # `generate` puts the prompt first
        self._prompt_text = ""  # the prompt as shown (when not skipped), redrawn with each draft
        self._committed_text = ""  # what `on_finalized_text` received so far
        self._committed_ids: list[int] = []  # the answer's committed blocks (uncut): drafts continue them
        self._ended = False  # an end token was committed: the rest is not shown
        self._prefix_printed = False
        self._rows_above = 0  # terminal rows of the drawn area above the cursor

    # ---- the protocol -------------------------------------------------------------------------------

    def put(self, value: torch.LongTensor) -> None:
        """Receive the prompt (first call) or a committed block ([n] or [1, n])."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextDiffusionStreamer only supports batch size 1")
        ids = value.reshape(-1)
        if self._awaiting_prompt:  # the prompt is never cut: a chat prompt holds EoT tokens of earlier turns
            self._awaiting_prompt = False
            if not self.skip_prompt:
                self._prompt_text = self.tokenizer.decode(ids, **self.decode_kwargs)
            super().put(ids)
            return
        self._committed_ids += ids.tolist()
        if self._ended:
            return
        if self.eos_token_ids is not None:
            end = answer_end(ids.tolist(), self.eos_token_ids)
            self._ended = end < len(ids)
            ids = ids[:end]
        super().put(ids)

    def put_draft(self, value: torch.LongTensor, **kwargs) -> None:
        """Receive the canvas ([n] or [1, n]): the answer after the committed blocks, masks still in place."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextDiffusionStreamer only supports batch size 1")
        ids = self._committed_ids + value.reshape(-1).tolist()
        if self.eos_token_ids is not None:
            ids = ids[: answer_end(ids, self.eos_token_ids)]
        text = render_draft(ids, self.tokenizer, self.mask_token_id, self.mask_symbol, **self.decode_kwargs)
        self.drafts.append(text)
        self.on_draft_text(text)
        if self.sleep_time is not None:
            time.sleep(self.sleep_time)

    def end(self) -> None:
        super().end()
        self._reset_answer()

    # ---- what is shown ------------------------------------------------------------------------------

    def on_draft_text(self, text: str) -> None:
        """Redraw the draft in place, on a terminal only."""
        if self.live:
            columns, lines = shutil.get_terminal_size()
            shown = _fit(_one_line(self.prefix + self._prompt_text + text), columns * max(lines - 1, 1) - 1)
            self._redraw(shown)
            self._rows_above = _rows_above_cursor(_display_width(shown), columns)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Committed text. On a terminal the whole answer replaces the draft when the stream ends; elsewhere each
        piece is printed as it comes."""
        self._committed_text += text
        if self.live:
            if stream_end:
                self._redraw(self.prefix + self._committed_text + "\n")
            return
        if not self._prefix_printed:
            print(self.prefix, end="", flush=True)
            self._prefix_printed = True
        print(text, flush=True, end="" if not stream_end else None)

    def _redraw(self, text: str) -> None:
        """Go back to the start of the drawn area, clear to the end of the screen, draw `text`."""
        up = f"\x1b[{self._rows_above}A" if self._rows_above else ""
        print(f"\r{up}\x1b[J{text}", end="", flush=True)


__all__ = ["EOT_TOKEN", "TextDiffusionStreamer", "answer_end", "end_token_ids", "render_draft", "truncate_at_eos"]
