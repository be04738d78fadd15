"""`llada-hf serve` with a LLaDA-V model: chat messages with OpenAI `image_url` parts answer as the model's own
`generate` on the processor's inputs; the vision tower runs once per request; images arrive as data: URLs, and (behind
flags) as http(s) URLs with size and time limits and as files under an allowed folder; every limit is an OpenAI
error (400 / 413); the openai package and `llada-hf serve FOLDER` work end to end."""

import base64
import contextlib
import functools
import http.server
import io
import os
import threading
import time

import pytest
import torch
from llada_v_helpers import tiny_processor, write_official_checkpoint
from PIL import Image
from serve_helpers import InProcessServer, request_json, serve_process, stream_events

from transformers import AutoModel

from llada_hf import end_token_ids, truncate_at_eos
from llada_hf.serving.images import ImageLimits


pytestmark = pytest.mark.timeout(240)
SETTINGS = {"max_new_tokens": 8, "steps": 8, "block_length": 4}
FIELDS = {"max_tokens": 8, "steps": 8, "block_length": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny LLaDA-V (model + processor)."""
    root = tmp_path_factory.mktemp("serve-vision")
    write_official_checkpoint(root / "official")
    model = AutoModel.from_pretrained(root / "official").eval()
    model.save_pretrained(root / "saved")
    tiny_processor().save_pretrained(root / "saved")
    return str(root / "saved")


@pytest.fixture(scope="module")
def model_and_processor(folder):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return AutoModel.from_pretrained(folder).eval(), processor


@pytest.fixture(scope="module")
def server(model_and_processor, tmp_path_factory):
    model, processor = model_and_processor
    limits = ImageLimits(max_images=3, max_bytes=20_000, max_pixels=200 * 200, allow_urls=True, fetch_timeout=2.0,
                         local_folder=str(tmp_path_factory.mktemp("media")))
    with InProcessServer(model, processor, max_body_bytes=1 << 20, images=limits) as running:
        yield running


def picture(width: int, height: int, seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def body(content, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **FIELDS, **fields}


def expected(model, processor, content: list) -> str:
    """`generate` on the processor's inputs for the same message (images as PIL), cut and decoded as the server."""
    inputs = processor.apply_chat_template([[{"role": "user", "content": content}]], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    answer = model.generate(**inputs, **SETTINGS)[:, inputs["input_ids"].shape[1]:]
    kept = truncate_at_eos(answer, end_token_ids(processor.tokenizer, model.generation_config))[0]
    return processor.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def chat(server, content, **fields):
    status, _, reply = request_json(server.url + "/v1/chat/completions", body(content, **fields))
    return status, reply


PICTURES = [picture(70, 40, 0), picture(30, 50, 1), picture(44, 44, 2)]


@pytest.mark.parametrize("layout", ["one image", "two images around text", "text only"])
def test_answers_equal_generate_on_the_processor_inputs(server, model_and_processor, layout):
    model, processor = model_and_processor
    if layout == "one image":
        parts = [(PICTURES[0], None), (None, "What is in the image?")]
    elif layout == "two images around text":
        parts = [(PICTURES[1], None), (None, "Which one is brighter, this or "), (PICTURES[2], None)]
    else:
        parts = [(None, "Hello there")]
    sent = [image_part(data_url(image)) if image is not None else text_part(text) for image, text in parts]
    local = [{"type": "image", "image": image} if image is not None else {"type": "text", "text": text}
             for image, text in parts]
    status, reply = chat(server, sent)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == expected(model, processor, local)


def test_answers_differ_by_picture_and_count_the_placeholders(server, model_and_processor):
    model, processor = model_and_processor
    replies = [chat(server, [image_part(data_url(image)), text_part("What is it?")])[1] for image in PICTURES]
    assert len({reply["choices"][0]["message"]["content"] for reply in replies}) > 1
    inputs = processor(images=[PICTURES[0]], text=["<image>\nWhat is it?"], return_tensors="pt")
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    text_only = chat(server, [text_part("What is it?")])[1]
    assert replies[0]["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] == placeholders + 1  # + "\n"


def test_the_tower_runs_once_per_request_whatever_n(server, model_and_processor):
    model, _ = model_and_processor
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        status, reply = chat(server, [image_part(data_url(PICTURES[0])), text_part("What is it?")], n=3)
    finally:
        hook.remove()
    assert status == 200 and len(reply["choices"]) == 3
    assert len({choice["message"]["content"] for choice in reply["choices"]}) == 1  # greedy: the same answer
    assert len(calls) == 1


def test_streams_with_drafts_end_in_the_same_answer(server):
    content = [image_part(data_url(PICTURES[1])), text_part("What is it?")]
    whole = chat(server, content)[1]["choices"][0]["message"]["content"]
    events = stream_events(server.url + "/v1/chat/completions", body(content, stream=True, drafts=True))
    drafts = [data for event, data in events if event == "draft"]
    text = "".join(data["choices"][0]["delta"].get("content") or "" for event, data in events
                   if event is None and data != "[DONE]" and data["choices"])
    assert drafts and text == whole


def test_special_tokens_written_in_messages_stay_text(server, model_and_processor):
    _, processor = model_and_processor
    status, reply = chat(server, [image_part(data_url(PICTURES[0])), text_part("a <image> and a <|mdm_mask|>")])
    assert status == 200, reply  # `<image>` as text: no extra image, no infilled mask
    status, reply = chat(server, [text_part("<image>")])
    assert status == 200, reply


# ---- limits and sources ----------------------------------------------------------------------------------


def error_of(server, content, status: int, fragment: str) -> dict:
    got, reply = chat(server, content)
    assert got == status, reply
    assert fragment in reply["error"]["message"], reply
    assert reply["error"]["param"] == "messages"
    return reply["error"]


def test_limits_are_openai_errors(server):
    small = data_url(picture(20, 20, 3))
    error = error_of(server, [image_part(small)] * 4 + [text_part("?")], 400, "at most 3 per request")
    assert error["code"] == "too_many_images"
    noise = picture(150, 120, 4)  # noise does not compress: > 20 000 bytes
    assert len(png(noise)) > 20_000
    assert error_of(server, [image_part(data_url(noise))], 413, "at most 20000 bytes")["code"] == "image_too_large"
    flat = Image.new("RGB", (300, 300), "white")  # small file, too many pixels
    error_of(server, [image_part(data_url(flat))], 400, "300 x 300 pixels")
    error_of(server, [image_part("data:image/png;base64,@@@")], 400, "invalid base64")
    error_of(server, [image_part("data:image/png;base64," + base64.b64encode(b"not a png").decode())], 400,
             "Cannot read an image")
    error_of(server, [image_part("ftp://example.com/a.png")], 400, "data: URL")
    got, reply = chat(server, [{"type": "image_url", "image_url": {"url": small, "size": 3}}])
    assert got == 400 and "size" in reply["error"]["message"]


def test_a_text_server_refuses_images_and_a_vision_server_refuses_urls_by_default(model_and_processor):
    model, processor = model_and_processor
    with InProcessServer(model, processor, images=ImageLimits()) as server:
        error_of(server, [image_part("http://127.0.0.1:9/a.png")], 400, "--allow-image-urls")
        error_of(server, [image_part("file:///etc/hostname")], 400, "--allowed-local-media-path")
        assert request_json(server.url + "/health")[2]["images"]["max_images"] == 8


class _Pictures(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(4)
        data = png(PICTURES[0]) if self.path != "/big.png" else png(picture(150, 120, 4))
        if self.path == "/missing.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def picture_site():
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pictures)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()


def test_http_urls_are_fetched_within_limits(server, model_and_processor):
    model, processor = model_and_processor
    question = text_part("What is it?")
    with picture_site() as site:
        status, reply = chat(server, [image_part(site + "/cat.png"), question])
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == expected(
            model, processor, [{"type": "image", "image": PICTURES[0]}, {"type": "text", "text": "What is it?"}])
        error_of(server, [image_part(site + "/big.png"), question], 413, "at most 20000 bytes")
        error_of(server, [image_part(site + "/missing.png"), question], 400, "Could not fetch")
        started = time.monotonic()
        error_of(server, [image_part(site + "/slow.png"), question], 400, "Could not fetch")
        assert time.monotonic() - started < 4


def test_local_files_only_under_the_allowed_folder(server, model_and_processor, tmp_path):
    model, processor = model_and_processor
    allowed = server.app.state.config.images.local_folder
    inside = os.path.join(allowed, "cat.png")
    PICTURES[0].save(inside)
    outside = tmp_path / "dog.png"
    PICTURES[1].save(outside)
    escape = os.path.join(allowed, "link.png")
    if not os.path.lexists(escape):
        os.symlink(outside, escape)
    question = text_part("What is it?")
    status, reply = chat(server, [image_part("file://" + inside), question])
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == expected(
        model, processor, [{"type": "image", "image": PICTURES[0]}, {"type": "text", "text": "What is it?"}])
    error_of(server, [image_part("file://" + str(outside)), question], 400, "must lie under")
    error_of(server, [image_part("file://" + escape), question], 400, "must lie under")


# ---- as users run it ---------------------------------------------------------------------------------------


@functools.cache
def _openai():
    import openai

    return openai


def test_llada_hf_serve_a_vision_folder_with_the_openai_package(folder, model_and_processor):
    model, processor = model_and_processor
    with serve_process(folder, "--max-new-tokens", "8", "--steps", "8", "--block-length", "4") as (_, url):
        client = _openai().OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=os.path.basename(folder), messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(PICTURES[2])}},
            {"type": "text", "text": "What is in the image?"}]}])
        local = [{"type": "image", "image": PICTURES[2]}, {"type": "text", "text": "What is in the image?"}]
        assert reply.choices[0].message.content == expected(model, processor, local)
        with pytest.raises(_openai().BadRequestError, match="at most 8 per request"):
            client.chat.completions.create(model=os.path.basename(folder), messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(PICTURES[0])}}] * 9}])
