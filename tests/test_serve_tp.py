"""`llada-hf serve --tensor-parallel` under torchrun: two CPU processes (gloo), the model sharded with
transformers' tensor parallelism (`tp_plan="auto"`, the `base_model_tp_plan` of `LladaConfig`); rank 0 serves
HTTP and broadcasts each engine operation, rank 1 replays it, so both run every forward together. The answers
equal those of one unsharded process, and SIGTERM stops both ranks."""

import concurrent.futures
import os
import signal
import sys

import pytest
from serve_helpers import chat_body, load_chat_model, request_json, save_chat_model, serve_process, stream_events  # noqa: E402
from test_serve import expected_text  # noqa: E402


pytestmark = pytest.mark.timeout(300)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "llada_hf.cli"]


def test_a_tensor_parallel_server_on_two_cpu_processes(tmp_path):
    model_dir = save_chat_model(tmp_path / "tiny")
    model, tokenizer = load_chat_model(model_dir)
    questions = ["where did the cat sit?", "what did the dog say?", "where did the fox sit?"]
    with serve_process(model_dir, "--tensor-parallel", "--max-new-tokens", "8", "--steps", "8",
                       launcher=TORCHRUN, env={"OMP_NUM_THREADS": "1"}, timeout=180) as (process, url):
        assert request_json(url + "/health")[2]["world_size"] == 2
        with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
            results = list(pool.map(lambda q: request_json(url + "/v1/chat/completions", chat_body(q)), questions))
        for question, (status, _, body) in zip(questions, results):
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == expected_text(model, tokenizer, question,
                                                                            max_new_tokens=8, steps=8)
        events = stream_events(url + "/v1/chat/completions", chat_body(questions[0], stream=True, drafts=True,
                                                                       block_length=4))
        text = "".join(d["choices"][0]["delta"].get("content", "") for e, d in events
                       if e is None and d != "[DONE]" and d["choices"])
        assert text == expected_text(model, tokenizer, questions[0], max_new_tokens=8, steps=8, block_length=4)
        assert any(event == "draft" for event, _ in events)
        process.send_signal(signal.SIGTERM)
        process.wait(60)  # torchrun ends when both ranks have: rank 0 tells rank 1 to stop
        stderr = process.stderr.read()
    assert "llada_hf" not in stderr, stderr[-3000:]  # no rank failed (torchrun reports the signal it got itself)
    with pytest.raises(ProcessLookupError):  # no rank left behind
        os.killpg(process.pid, 0)
