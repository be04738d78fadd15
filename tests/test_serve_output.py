"""The parts of `llada-hf serve` behind HTTP, alone: the engine thread's output (where an answer ends, its text
decoded a few tokens at a time, stop strings, drafts), one device-to-host copy per state per step, requests turned
into `generate` settings and checked without a dry run, and handlers called without the app."""

import asyncio
import json
import threading

import pytest
import torch
from helpers import tokenizer_model

from llada_hf.serving.handlers import ChatCompletionHandler, CompletionHandler, ServerConfig
from llada_hf.serving.output import AnswerOutput, AnswerText, IncrementalDetokenizer, TokenPieces
from llada_hf.serving.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, check_generate_kwargs
from llada_hf.serving.scheduler import Request, Scheduler
from llada_hf.streaming_llada import answer_end, end_token_ids
from llada_hf.tokenization import train_tokenizer


pytestmark = pytest.mark.timeout(120)

# Characters of two to four bytes: the tokenizer below never saw the emoji and the CJK characters, so it spells
# them byte by byte (a token is not a character).
TEXT = "héllo 😀 日本語 wörld, the cat sat on the mat"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the cat sat on the mat", "héllo wörld", "the dog said hello"], vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tokenizer_model(tokenizer)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_text_decoded_a_few_tokens_at_a_time_equals_the_whole_decode(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert any("\ufffd" in decode(tokenizer, [token]) for token in ids)  # some characters span two tokens
    for size in (1, 2, 3, 7):
        detokenizer = IncrementalDetokenizer(tokenizer)
        pieces = [detokenizer.extend(ids[start : start + size]) for start in range(0, len(ids), size)]
        pieces.append(detokenizer.extend([], final=True))
        assert "".join(pieces) == decode(tokenizer, ids)
        assert not any("\ufffd" in piece for piece in pieces)  # a character is sent whole, never in halves


@pytest.mark.parametrize("stop", ["cat", "t s", "😀", "wörld, the", "not in the text"])
def test_stop_strings_cut_the_text_where_the_whole_decode_would(tokenizer, stop):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    whole = decode(tokenizer, ids)
    expected = whole[: whole.index(stop)] if stop in whole else whole
    for size in (1, 4):
        text, sent = AnswerText(tokenizer, [stop, "zzz"]), ""
        for end in range(size, len(ids) + size, size):
            sent += text.advance(ids[:end], final=end >= len(ids))
            assert expected.startswith(sent)  # nothing after a stop string is ever sent, not even its start
            if text.stopped:
                break
        assert sent == expected and text.stopped == (stop in whole)


def test_an_answer_ends_at_its_first_decided_end_token(tokenizer):
    mask, eot = tokenizer.mask_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    words = tokenizer("the cat sat", add_special_tokens=False).input_ids
    pieces = TokenPieces(tokenizer, mask)
    output = AnswerOutput(tokenizer, pieces, set(end_token_ids(tokenizer)), stop=[], drafts=True)
    step = output.update([words[0], mask, eot, mask], finished=False)  # the end token is not decided yet
    assert not output.done and step.text == decode(tokenizer, words[:1])
    assert step.draft == {"tokens": [decode(tokenizer, words[:1]), None, "", None], "end_at": 2, "committed": 1}
    step = output.update([words[0], words[1], eot, mask], finished=False)
    assert output.done and output.finish_reason == "stop" and output.ids == words[:2]
    assert step.text == decode(tokenizer, words[:2])[len(decode(tokenizer, words[:1])) :] and step.draft is None
    unended = AnswerOutput(tokenizer, pieces, set(end_token_ids(tokenizer)), stop=[], drafts=False)
    assert unended.update(words, finished=True).text == decode(tokenizer, words)
    assert unended.finish_reason == "length"
    assert answer_end([*words, eot, *words], {eot}) == len(words)  # the cut every tool shares


def test_each_state_is_read_once_per_step_however_many_rows(model, tokenizer, monkeypatch):
    """Four rows of one state: the engine thread copies the state's canvas to the host once per step (a copy per
    row would wait for the device once per row)."""
    answer_length, reads, done = 8, [], threading.Event()
    original = torch.Tensor.tolist

    def counting_tolist(tensor):
        if threading.current_thread().name == "llada-engine" and tensor.shape and tensor.shape[-1] >= answer_length:
            reads.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    scheduler = Scheduler(model, tokenizer)
    events = []

    def sink(event):
        events.append(event)
        if sum(e.kind == "finished" for e in events) == 4:
            done.set()

    prompt = tokenizer("the cat", add_special_tokens=False).input_ids
    scheduler.submit(Request(prompt, {"max_new_tokens": answer_length, "steps": answer_length}, n=4, stream=True,
                             drafts=True, sink=sink))
    scheduler.start()
    try:
        assert done.wait(60)
    finally:
        scheduler.stop()
    assert len(reads) == scheduler.stats.steps >= 1
    assert all(shape[0] == 4 for shape in reads)  # the whole state at once
    assert [event.kind for event in events].count("progress") >= 4  # every row still got its drafts


def test_a_request_turns_itself_into_generate_settings():
    body = ChatCompletionRequest.model_validate_json(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 7,
        "min_tokens": 2, "temperature": 0.5, "steps": 4, "block_length": 2}))
    assert body.to_generate_kwargs({"max_new_tokens": 128, "steps": 64, "remasking": "random"}) == {
        "max_new_tokens": 7, "steps": 4, "remasking": "random", "block_length": 2, "min_new_tokens": 2,
        "temperature": 0.5}
    body = CompletionRequest.model_validate_json(json.dumps({"model": "m", "prompt": "hi"}))
    assert body.to_generate_kwargs({"max_new_tokens": 16}) == {"max_new_tokens": 16}


@pytest.mark.parametrize("settings, field", [
    ({"max_new_tokens": 8, "steps": 0}, "steps"),
    ({"max_new_tokens": 0}, "max_tokens"),
    ({"max_new_tokens": 8, "min_new_tokens": -1}, "min_tokens"),
    ({"max_new_tokens": 8, "confidence_threshold": 1.5}, "confidence_threshold"),
    ({"max_new_tokens": 8, "steps": 1, "block_length": 2}, "steps"),  # the block plan: 4 blocks need 4 steps
])
def test_settings_are_checked_without_a_dry_run(model, monkeypatch, settings, field):
    monkeypatch.setattr(type(model), "prepare_decoding", lambda *args, **kwargs: pytest.fail("a dry run"))
    check_generate_kwargs(model, {"max_new_tokens": 8, "steps": 4, "block_length": 4})
    with pytest.raises(OpenAIError) as error:
        check_generate_kwargs(model, settings)
    assert error.value.status == 400 and error.value.param == field and f"`{field}`" in error.value.message


def test_handlers_work_without_the_app(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch=2)
    config = ServerConfig(model_name="tiny")
    chat = ChatCompletionHandler(model, tokenizer, scheduler, config)
    content = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    body = ChatCompletionRequest.model_validate_json(json.dumps({"model": "tiny", "messages": [
        {"role": "user", "content": content}]}))
    with pytest.raises(OpenAIError, match="takes no images") as error:
        asyncio.run(chat.prompts(body, {"max_new_tokens": 8}))
    assert error.value.param == "messages"
    completion = CompletionHandler(model, tokenizer, scheduler, config)
    body = CompletionRequest.model_validate_json(json.dumps({"model": "tiny", "prompt": ["a", "b"], "n": 2}))
    with pytest.raises(OpenAIError, match="exceed this server's batch"):
        asyncio.run(completion.prompts(body, {"max_new_tokens": 8}))
