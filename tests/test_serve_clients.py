"""`llada-hf serve` as a user runs it (a subprocess on a loopback port), driven by real clients: the official
`openai` package (chat, completions, streaming, the API key) and plain `curl`; a graceful SIGTERM."""

import json
import re
import signal
import subprocess
import threading
import time
import urllib.error
from pathlib import Path

import pytest
from serve_helpers import chat_body, load_chat_model, request_json, save_chat_model, serve_process, stream_events  # noqa: E402
from test_serve import expected_text  # noqa: E402


pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("serve-clients") / "tiny")


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return load_chat_model(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    with serve_process(model_dir, "--api-key", "k3y", "--max-new-tokens", "8", "--steps", "8") as (process, url):
        yield url


def test_the_openai_package_chat_completions_and_streaming(server, model_and_tokenizer):
    import openai
    model, tokenizer = model_and_tokenizer
    client = openai.OpenAI(base_url=server + "/v1", api_key="k3y", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny"]
    question = "where did the cat sit?"
    expected = expected_text(model, tokenizer, question, max_new_tokens=8, steps=8)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          temperature=0)
    assert chat.choices[0].message.content == expected and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens >= 1
    # diffusion settings travel as extra body fields
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          max_tokens=8, extra_body={"steps": 4, "block_length": 4})
    assert chat.choices[0].message.content == expected_text(model, tokenizer, question, max_new_tokens=8, steps=4,
                                                            block_length=4)
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], stream=True,
        extra_body={"block_length": 2}) if chunk.choices]
    assert "".join(pieces) == expected_text(model, tokenizer, question, max_new_tokens=8, steps=8, block_length=2)
    completion = client.completions.create(model="tiny", prompt="the dog", max_tokens=6, extra_body={"steps": 6})
    assert completion.choices[0].text == expected_text(model, tokenizer, prompt="the dog", max_new_tokens=6, steps=6)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tiny", prompt="the dog", max_tokens=6, stream=True, extra_body={"steps": 6}))
    assert streamed == completion.choices[0].text


def test_the_openai_package_sees_openai_errors(server):
    import openai
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server + "/v1", api_key="k3y", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="steps"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"steps": 0})
    # an image sent to a text model: OpenAI's error, saying so (not a schema error)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
    with pytest.raises(openai.BadRequestError, match="This model takes no images") as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is in this picture?"}, image]}])
    assert error.value.status_code == 400 and error.value.param == "messages"
    assert error.value.type == "invalid_request_error"


def test_the_readme_client_snippet_runs(server, capsys):
    """The openai example of docs/serve.md (fenced `py`: it needs a running server, so the README and docs check that
    runs `python` snippets skips it) runs against this server."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text()
    section = readme[readme.index("## Serve"):]
    code = re.search(r"```py\n(.*?)```", section, re.S).group(1)
    code = code.replace("http://127.0.0.1:8000/v1", server + "/v1").replace('"unused"', '"k3y"')
    code = code.replace('model="model"', 'model="tiny"').replace('"steps": 64', '"steps": 8')
    exec(compile(code, "docs/serve.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()


def test_curl(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    body = json.dumps(chat_body("what did the dog say?", max_tokens=8))
    result = subprocess.run(["curl", "-sS", "--max-time", "60", server + "/v1/chat/completions",
                             "-H", "Content-Type: application/json", "-H", "Authorization: Bearer k3y", "-d", body],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["choices"][0]["message"]["content"] == expected_text(model, tokenizer, "what did the dog say?",
                                                                      max_new_tokens=8, steps=8)
    streamed = subprocess.run(["curl", "-sS", "-N", "--max-time", "60", server + "/v1/chat/completions",
                               "-H", "Content-Type: application/json", "-H", "Authorization: Bearer k3y",
                               "-d", json.dumps(chat_body("what did the dog say?", max_tokens=8, stream=True))],
                              capture_output=True, text=True, timeout=90)
    lines = [line[len("data: "):] for line in streamed.stdout.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(json.loads(line)["choices"][0]["delta"].get("content", "") for line in lines[:-1])
    assert text == answer["choices"][0]["message"]["content"]
    unauthorized = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", server + "/v1/models"],
                                  capture_output=True, text=True, timeout=60)
    assert unauthorized.stdout == "401"
    metrics = subprocess.run(["curl", "-sS", server + "/metrics", "-H", "Authorization: Bearer k3y"],
                             capture_output=True, text=True, timeout=60)
    assert "llada_forward_passes_total" in metrics.stdout


def test_sigterm_finishes_or_cancels_running_answers_in_bounded_time(model_dir):
    """SIGTERM while answers are being decoded: a short one finishes, a long one is cancelled with an error
    event when the grace period ends, new connections are refused, and the process exits 0 soon after."""
    with serve_process(model_dir, "--step-delay", "0.05", "--shutdown-grace", "1.5",
                       "--max-tokens-limit", "200") as (process, url):
        results = {}

        def run(name, body):
            try:
                results[name] = stream_events(url + "/v1/chat/completions", body, timeout=60)
            except Exception as error:  # noqa: BLE001  (recorded for the assertions)
                results[name] = error

        short = threading.Thread(target=run, args=("short", chat_body("hi", max_tokens=8, steps=8, stream=True)))
        long = threading.Thread(target=run, args=("long", chat_body("hi", max_tokens=200, steps=200, stream=True)))
        long.start()
        short.start()
        time.sleep(0.2)  # both are being decoded
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        took = time.monotonic() - started
        short.join(10)
        long.join(10)
    assert code == 0
    assert took < 1.5 + 8  # the grace period plus a few seconds to close
    assert results["short"][-1] == (None, "[DONE]")  # finished within the grace period
    last = results["long"][-1][1]
    assert isinstance(last, dict) and last["error"]["code"] == "server_shutting_down"  # cancelled, told why
    with pytest.raises(urllib.error.URLError):  # the port is closed
        request_json(url + "/health", timeout=2)


def test_serve_refuses_bad_flags_in_one_line(model_dir, tmp_path, capsys):
    from llada_hf_cli import build_parser, main

    assert build_parser().parse_args(["serve", "m"]).host == "127.0.0.1"  # loopback unless told otherwise
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--max-batch" in capsys.readouterr().out
    for argv, text in [([str(tmp_path / "missing")], "No such folder"),
                       ([model_dir, "--max-batch", "0"], "--max-batch"),
                       ([model_dir, "--port", "70000"], "--port must lie in 0..65535"),
                       ([model_dir, "--join-wait", "-1"], "--join-wait must be >= 0"),
                       ([model_dir, "--tensor-parallel"], "torchrun"),
                       ([model_dir, "--max-images", "0"], "--max-images"),
                       ([model_dir, "--max-image-bytes", "-1"], "--max-image-bytes"),
                       ([model_dir, "--image-fetch-timeout", "0"], "--image-fetch-timeout must be > 0"),
                       ([model_dir, "--allowed-local-media-path", str(tmp_path / "nowhere")], "is not a folder")]:
        assert main(["serve", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("llada-hf: error:") and text in err and len(err.splitlines()) == 1, (argv, err)
