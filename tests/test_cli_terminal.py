"""Streaming on a real terminal: transformers' streamer protocol, drafts redrawn in place under "model> ", the final
answer kept on screen, a progress bar only on a terminal. Checked in a pseudo-terminal, through a small emulator
of what the screen then shows."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch
from helpers import save_tiny_text_model

from transformers.generation.streamers import TextDiffusionStreamer as TransformersTextDiffusionStreamer

from llada_hf import LladaForMaskedDiffusion, TextDiffusionStreamer, end_token_ids, truncate_at_eos
from llada_hf.streaming_llada import render_draft


COLUMNS, LINES = 40, 8  # narrow: drafts wrap, and long ones must be clipped to the screen
GENERATION_FLAGS = ["--max-new-tokens", "24", "--steps", "12", "--block-length", "8"]


class Screen:
    """What a VT100-style terminal of `columns` x `lines` shows after the given output: printable characters with
    lazy wrapping, CR, LF, cursor up (CSI n A), erase below (CSI J) / to end of line (CSI K), save / restore cursor
    (ESC 7 / ESC 8); colours and other sequences are ignored. Rows that scrolled off the top are kept (scrollback)."""

    def __init__(self, columns: int, lines: int):
        self.columns, self.lines = columns, lines
        self.rows: list[list[str]] = [[]]
        self.continued: list[bool] = [False]  # the row continues the one above (wrapped)
        self.row = self.col = 0
        self.saved = (0, 0)

    def feed(self, text: str) -> "Screen":
        for match in re.finditer(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b([78])|(.)", text, re.S):
            params, command, save_restore, char = match.groups()
            if command:
                self._csi(command, int(params) if params.isdigit() else 1)
            elif save_restore:
                if save_restore == "7":
                    self.saved = (self.row, self.col)
                else:
                    self.row, self.col = self.saved
            else:
                self._char(char)
        return self

    def _top(self) -> int:
        return max(len(self.rows) - self.lines, 0)

    def _csi(self, command: str, count: int) -> None:
        if command == "A":
            self.row = max(self.row - count, self._top())
            self.col = min(self.col, self.columns - 1)
        elif command == "J":
            del self.rows[self.row + 1:], self.continued[self.row + 1:]
            del self.rows[self.row][self.col:]
        elif command == "K":
            del self.rows[self.row][self.col:]

    def _new_row(self, continued: bool) -> None:
        self.row += 1
        if self.row == len(self.rows):
            self.rows.append([])
            self.continued.append(continued)
        else:
            self.continued[self.row] = continued

    def _char(self, char: str) -> None:
        if char == "\r":
            self.col = 0
        elif char == "\n":
            self._new_row(continued=False)
        elif char >= " ":
            if self.col == self.columns:  # the lazy wrap happens with the next printed character
                self._new_row(continued=True)
                self.col = 0
            line = self.rows[self.row]
            line.extend(" " * (self.col - len(line)))
            line[self.col:self.col + 1] = [char]
            self.col += 1

    def text_lines(self) -> list[str]:
        """Logical lines: wrapped rows joined again."""
        lines = []
        for row, continued in zip(self.rows, self.continued):
            if continued and lines:
                lines[-1] += "".join(row)
            else:
                lines.append("".join(row))
        return [line.rstrip() for line in lines]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("terminal-model"))


def expected_answer(folder: str, prompt: str, chat: bool) -> str:
    """What the CLI streams for `prompt`, computed in this process: the answer up to its end token."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=24, steps=12, block_length=8)
    answer = truncate_at_eos(out[:, ids.shape[1]:], end_token_ids(tokenizer, model.generation_config))[0]
    return tokenizer.decode(answer, skip_special_tokens=True)


def shown_lines(text: str) -> list[str]:
    """`text` as the screen's logical lines show it."""
    return [line.rstrip() for line in text.split("\n")]


def contains_run(lines: list[str], run: list[str]) -> bool:
    return any(lines[i:i + len(run)] == run for i in range(len(lines)))


def run_in_terminal(argv: list[str], replies: list[tuple[str, str]] = ()) -> str:
    """Run `llada-hf ARGV` with stdin, stdout and stderr on a pseudo-terminal of COLUMNS x LINES; answer each
    (prompt, reply) pair when the prompt shows up; return everything the program wrote."""
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TERM="xterm")
    process = subprocess.Popen([sys.executable, "-m", "llada_hf.cli", *argv], stdin=follower, stdout=follower,
                               stderr=follower, env=env, close_fds=True)
    os.close(follower)
    output, pending, deadline = b"", list(replies), time.time() + 600
    while time.time() < deadline:
        if pending and output.decode(errors="replace").count(pending[0][0]) > len(replies) - len(pending):
            os.write(leader, pending.pop(0)[1].encode())
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the program ended and closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")[-2000:]
    return output.decode(errors="replace")


def test_chat_keeps_the_prefix_and_the_answer_on_a_terminal(saved_model):
    answer = expected_answer(saved_model, "hello", chat=True)
    assert answer  # a non-empty answer, or the test would prove little
    output = run_in_terminal(["chat", saved_model, *GENERATION_FLAGS], replies=[("you> ", "hello\n"), ("you> ", "\n")])
    assert "░" in output  # drafts were drawn
    lines = Screen(COLUMNS, LINES).feed(output).text_lines()
    assert "you> hello" in lines
    assert contains_run(lines, shown_lines(f"model> {answer}"))  # neither the prefix nor the answer was erased
    assert not any("░" in line for line in lines)  # no draft is left on the screen


def test_generate_stream_keeps_the_answer_on_a_terminal(saved_model):
    answer = expected_answer(saved_model, "the cat", chat=False)
    output = run_in_terminal(["generate", saved_model, "the", "cat", "--join", "--stream", *GENERATION_FLAGS])
    assert "░" in output
    lines = Screen(COLUMNS, LINES).feed(output).text_lines()
    assert contains_run(lines, shown_lines(answer)) and not any("░" in line for line in lines)


def test_progress_bar_only_on_a_terminal_and_not_when_quiet(saved_model):
    flags = ["generate", saved_model, "the cat", *GENERATION_FLAGS]
    shown = run_in_terminal(flags)
    assert "/12" in shown and "step" in shown  # tqdm's "n/12 [..., step/s]"
    assert "/12" not in run_in_terminal([*flags, "--quiet"])
    piped = subprocess.run([sys.executable, "-m", "llada_hf.cli", *flags], capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert piped.returncode == 0 and "/12" not in piped.stderr
    assert piped.stdout.strip() == expected_answer(saved_model, "the cat", chat=False).strip()


# ---- the streamer protocol -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_and_model(saved_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(saved_model), LladaForMaskedDiffusion.from_pretrained(saved_model).eval()


def test_transformers_own_diffusion_streamer_works_with_generate(tokenizer_and_model, capsys):
    tokenizer, model = tokenizer_and_model
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    streamer = TransformersTextDiffusionStreamer(tokenizer, skip_prompt=True)
    out = model.generate(ids, max_new_tokens=8, steps=8, block_length=4, streamer=streamer)
    printed = capsys.readouterr().out
    assert "\x1b[33m" in printed  # its drafts (in yellow) arrived through put_draft(value=...)
    answer = tokenizer.decode(out[0, ids.shape[1]:])
    assert Screen(200, 24).feed(printed).text_lines() == [*shown_lines(answer), ""]  # drafts gone, answer kept


def test_transformers_own_diffusion_streamer_never_shows_committed_text_twice(tokenizer_and_model, capsys):
    """transformers' streamer prints the committed text, then the draft after it: the draft must be the canvas
    still being decoded (from the current block on), not the whole answer, or the committed text shows twice."""
    tokenizer, model = tokenizer_and_model
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    streamer = TransformersTextDiffusionStreamer(tokenizer, skip_prompt=True)
    screen, printed, screens = Screen(400, 24), [], []
    put_draft, on_finalized_text = streamer.put_draft, streamer.on_finalized_text

    def record_finalized(text, stream_end=False):
        printed.append(text)
        on_finalized_text(text, stream_end=stream_end)

    def record_draft(value, **kwargs):
        put_draft(value, **kwargs)
        screens.append(("".join(printed), "\n".join(screen.feed(capsys.readouterr().out).text_lines())))

    streamer.put_draft, streamer.on_finalized_text = record_draft, record_finalized
    capsys.readouterr()
    out = model.generate(ids, max_new_tokens=16, steps=16, block_length=4, streamer=streamer,
                         return_dict_in_generate=True, output_history=True)
    answer_ids = out.sequences[0, ids.shape[1]:]
    assert len(screens) == len(out.history) == 16
    for step, ((committed_text, shown), canvas) in enumerate(zip(screens, out.history)):
        block_start = ids.shape[1] + 4 * (step // 4)  # 4 blocks of 4 tokens, one step per token
        # On screen: the committed text once, then the draft of what is not committed yet, masks included
        assert tokenizer.decode(answer_ids[: block_start - ids.shape[1]]).startswith(committed_text)
        assert shown == committed_text + tokenizer.decode(canvas[0, block_start:])
    assert "".join(printed) == tokenizer.decode(answer_ids)
    assert screen.feed(capsys.readouterr().out).text_lines() == [*shown_lines(tokenizer.decode(answer_ids)), ""]


def test_our_streamer_drafts_show_the_whole_answer_at_every_step(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    streamer = TextDiffusionStreamer(tokenizer, skip_prompt=True, live=False)
    out = model.generate(ids, max_new_tokens=16, steps=16, block_length=4, streamer=streamer,
                         return_dict_in_generate=True, output_history=True)
    assert streamer.drafts == [render_draft(canvas[0, ids.shape[1]:].tolist(), tokenizer, tokenizer.mask_token_id)
                               for canvas in out.history]
    assert streamer.drafts[0].count("░") == 15 and "░" not in streamer.drafts[-1]


def test_our_streamer_is_transformers_streamer_and_redraws_in_place(tokenizer_and_model, capsys, monkeypatch):
    tokenizer, model = tokenizer_and_model
    assert issubclass(TextDiffusionStreamer, TransformersTextDiffusionStreamer)
    monkeypatch.setenv("COLUMNS", "20")
    monkeypatch.setenv("LINES", "4")
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    streamer = TextDiffusionStreamer(tokenizer, skip_prompt=True, prefix="model> ", live=True)
    out = model.generate(ids, max_new_tokens=24, steps=24, block_length=8, streamer=streamer)
    answer = tokenizer.decode(out[0, ids.shape[1]:])
    assert len(streamer.drafts) == 24 and streamer.drafts[0].count("░") == 23
    assert Screen(20, 4).feed(capsys.readouterr().out).text_lines() == [*shown_lines(f"model> {answer}"), ""]


def test_streamer_cuts_at_the_end_token_and_needs_a_mask_id(tokenizer_and_model, capsys):
    tokenizer, _ = tokenizer_and_model
    cat, dog = tokenizer(" cat").input_ids, tokenizer(" dog").input_ids
    streamer = TextDiffusionStreamer(tokenizer, skip_prompt=True, prefix="model> ", live=False,
                                     eos_token_ids=tokenizer.eos_token_id)
    streamer.put(torch.tensor([tokenizer("hi").input_ids]))  # the prompt
    streamer.put_draft(value=torch.tensor([[*cat, tokenizer.eos_token_id, *dog]]))
    streamer.put(torch.tensor([[*cat, tokenizer.eos_token_id, *dog]]))
    streamer.put(torch.tensor([dog]))
    streamer.end()
    assert capsys.readouterr().out == "model>  cat\n"
    assert streamer.drafts == [" cat"]
    tokenizer.mask_token = None
    try:
        with pytest.raises(ValueError, match="mask_token_id"):
            TextDiffusionStreamer(tokenizer)
    finally:
        tokenizer.mask_token = "<|mdm_mask|>"
