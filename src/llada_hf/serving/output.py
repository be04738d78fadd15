"""What the engine thread makes of an answer after each step: where it ends, the text that became final, its draft.

The web handlers only format what comes out of here. An answer ends at its first committed end token (EOS / EoT:
`answer_end`, the cut every tool of the package shares), at the first stop string of its text, or when its row
finishes. Its text is detokenized incrementally: a step decodes the tokens it committed with the few before them,
never the whole answer again. Text that could still change is held back: a trailing incomplete character
(byte-level tokens) and an ending that may be the start of a stop string.
"""

from dataclasses import dataclass

from ..streaming_llada import answer_end


# As `generate`'s users decode an answer (`tokenizer.decode(answer, skip_special_tokens=True)`): the text a client
# gets equals theirs.
DECODE_KWARGS = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


class IncrementalDetokenizer:
    """The text of a growing list of token ids, decoded a few tokens at a time.

    As text-generation-inference and vLLM do: the new tokens are decoded together with the tokens of the previous
    piece (the window `[_prefix, _read)`) and only the text they add is kept, so a token whose text depends on its
    neighbour (a leading space, the other bytes of a character) comes out as in `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # [_prefix, _read): the previous piece, decoded again as the new tokens' context
        self._read = 0

    def extend(self, ids: list[int], final: bool = False) -> str:
        """Add `ids`; return the text that became complete ("" while a character still misses bytes, unless
        `final`: then everything left comes out)."""
        if not ids and not final:  # most steps leave the decided prefix as it was: nothing to decode
            return ""
        self.ids += ids
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], **DECODE_KWARGS)
        after = self.tokenizer.decode(self.ids[self._prefix :], **DECODE_KWARGS)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]


class AnswerText:
    """The text of one answer as its committed ids grow: what may be sent now, and whether a stop string ended it."""

    def __init__(self, tokenizer, stop: list[str]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.text = ""  # the answer's text so far (cut at a stop string)
        self.sent = 0  # characters of `text` already returned by `advance`
        self.stopped = False

    @property
    def ids(self) -> list[int]:
        """The answer's token ids so far."""
        return self.detokenizer.ids

    def advance(self, ids: list[int], final: bool) -> str:
        """Take the answer's committed ids so far (a list that only grows) and return the text that became final;
        `final`: no more ids will come, so nothing is held back."""
        searched = len(self.text)
        self.text += self.detokenizer.extend(ids[len(self.ids) :], final)
        stop_at = self._first_stop(searched)
        if stop_at is not None:
            self.text, self.stopped = self.text[:stop_at], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _first_stop(self, searched: int) -> int | None:
        """Where the first stop string starts; `text[:searched]` held none, so only matches that end after it are
        looked for."""
        start = max(0, searched - max((len(stop) for stop in self.stop), default=0) + 1)
        found = [position for position in (self.text.find(stop, start) for stop in self.stop) if position >= 0]
        return min(found, default=None)

    def _held_back(self) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        return max((size for stop in self.stop for size in range(1, len(stop)) if self.text.endswith(stop[:size])),
                   default=0)


class TokenPieces:
    """Each token's own text, for drafts: decoded once per token id (a draft shows every position at every step)."""

    def __init__(self, tokenizer, mask_id: int):
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self._pieces: dict[int, str] = {}

    def of(self, ids: list[int]) -> list[str | None]:
        """The text of each token; None for the mask token."""
        new = sorted(set(ids) - self._pieces.keys() - {self.mask_id})
        if new:
            self._pieces.update(zip(new, self.tokenizer.batch_decode([[token] for token in new], **DECODE_KWARGS)))
        return [None if token == self.mask_id else self._pieces[token] for token in ids]


@dataclass
class StepOutput:
    """What one step changed in an answer: `text` that became final ("" when none) and, when asked for, the draft:
    the whole canvas (`tokens`: each position's text, None where still masked), the first end token in it (`end_at`,
    after which nothing belongs to the answer) and the length of the decided prefix (`committed`)."""

    text: str
    draft: dict | None = None


class AnswerOutput:
    """One row's answer on the engine thread: decides where it ends and turns each step's canvas into final text
    and drafts.

    Args:
        tokenizer: decodes the answer.
        pieces: the token texts of the drafts (shared by every row).
        end_token_ids: the ids that end an answer (EOS, EoT).
        stop: stop strings: the answer ends before the first one.
        drafts: make a draft after every step.
    """

    def __init__(self, tokenizer, pieces: TokenPieces, end_token_ids: set[int], stop: list[str], drafts: bool):
        self._text = AnswerText(tokenizer, stop)
        self.pieces = pieces
        self.end_token_ids = end_token_ids
        self.drafts = drafts
        self.done = False
        self.finish_reason: str | None = None  # "stop" (an end token or a stop string) or "length", once done

    @property
    def ids(self) -> list[int]:
        """The answer's token ids so far (cut at its end token)."""
        return self._text.ids

    @property
    def text(self) -> str:
        """The answer's text so far (cut at a stop string)."""
        return self._text.text

    def update(self, canvas: list[int], finished: bool) -> StepOutput:
        """Read the row's canvas after a step (the answer, mask ids where still masked); `finished`: the engine has
        finished the row, so every position counts, masked or not."""
        mask_id = self.pieces.mask_id
        decided = len(canvas) if finished or mask_id not in canvas else canvas.index(mask_id)
        end = answer_end(canvas[:decided], self.end_token_ids)
        ended = end < decided
        text = self._text.advance(canvas[:end], final=ended or finished)
        self.done = ended or finished or self._text.stopped
        if self.done:
            self.finish_reason = "stop" if ended or self._text.stopped else "length"
            return StepOutput(text)
        return StepOutput(text, self._draft(canvas, decided) if self.drafts else None)

    def _draft(self, canvas: list[int], decided: int) -> dict:
        end = answer_end(canvas, self.end_token_ids)
        return {"tokens": self.pieces.of(canvas), "end_at": end if end < len(canvas) else None, "committed": decided}
