"""The `llada-hf` command with bad input (one line, exit code 1, nothing loaded first) and answers cut at their first
end token, in the output and in `chat`'s history."""

import json
from types import SimpleNamespace

import pytest
import torch

from llada_hf import LladaConfig, LladaForMaskedDiffusion
from llada_hf.cli import main
from llada_hf.tokenization import EOT, model_token_ids, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"the {w} sat on the {v} mat" for w in ("cat", "dog", "bird") for v in ("red", "blue")]
    return train_tokenizer(texts * 4, vocab_size=290)


def save_model(folder, tokenizer, **config_overrides) -> str:
    torch.manual_seed(0)
    config = LladaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         **{**model_token_ids(tokenizer), **config_overrides})
    LladaForMaskedDiffusion(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    return save_model(tmp_path_factory.mktemp("cli-inputs-model"), tokenizer)


def one_line_error(capsys) -> str:
    """The error line, which must end stderr, with no traceback (Python's own warnings may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("llada-hf: error:"), err
    assert sum(line.startswith("llada-hf: error:") for line in lines) == 1, err
    return lines[-1]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        (["--top-p", "nan"], "--top-p must be a finite number"),
        (["--confidence-threshold=-inf"], "--confidence-threshold must be a finite number"),
        (["--parallel-factor", "nan"], "--parallel-factor must be a finite number"),
        (["--dtype", "float8"], "--dtype 'float8' is not supported"),
    ],
)
def test_generation_flags_that_cannot_run_are_one_line(saved_model, capsys, command, flags, message):
    prompt = ["hi"] if command == "generate" else []
    assert main([command, saved_model, *prompt, *flags]) == 1
    assert message in one_line_error(capsys)


def test_a_device_the_machine_lacks_is_one_line(saved_model, capsys, monkeypatch):
    monkeypatch.setattr("llada_hf.loading._has_accelerator", lambda device_type: False)
    assert main(["generate", saved_model, "hi", "--device", "cuda"]) == 1
    assert "no cuda device; use --device cpu" in one_line_error(capsys)


def test_a_missing_model_folder_is_named(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 1
    assert "No such folder" in one_line_error(capsys)
    assert main(["publish", str(tmp_path / "nope"), "alice/tiny", "--dry-run"]) == 1
    assert "No such folder" in one_line_error(capsys)


def train_argv(model: str, data, out) -> list[str]:
    return ["train", "--model_name_or_path", model, "--dataset_path", str(data), "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": }'], "line 2 is not valid JSON"),
        (['["a", "b"]', '{"prompt": "a", "completion": "b"}'], "line 1 is a JSON list, not an object"),
    ],
)
def test_train_names_the_bad_jsonl_line(saved_model, tmp_path, capsys, lines, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines))
    assert main(train_argv(saved_model, data, tmp_path / "out")) == 1
    assert message in one_line_error(capsys)


def test_train_checks_paths_before_loading_anything(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}')
    assert main(train_argv(str(tmp_path / "no-model"), data, tmp_path / "out")) == 1
    assert "No such folder" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_train_runs_on_a_cpu_with_the_documented_flags_and_names_the_mask_token(tmp_path, tokenizer):
    # An official LLaDA tokenizer lists the mask only as an additional special token: mask_token_id is None.
    official_like = train_tokenizer(["the cat sat on the red mat"] * 4, vocab_size=290)
    official_like.mask_token = None
    model = save_model(tmp_path / "model", official_like, mask_token_id=2)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "the cat", "completion": " sat"}) for _ in range(4)))
    out = tmp_path / "out"
    assert main(train_argv(model, data, out)) == 0  # no --bf16 false needed: bf16 only where the device has it
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).mask_token_id == 2


def test_publish_refuses_a_model_that_could_not_generate(tmp_path, tokenizer, capsys):
    folder = save_model(tmp_path / "no-mask", tokenizer, mask_token_id=None)
    capsys.readouterr()  # the save's progress bar
    assert main(["publish", folder, "alice/tiny", "--dry-run"]) == 1
    assert "could not generate" in one_line_error(capsys)


# ---- answers end at their first end token ----------------------------------------------------------


@pytest.fixture
def fixed_answer(tokenizer, monkeypatch):
    """Make `generate` answer " cat" EoT " dog" EOS (what a model commits after its end of turn is junk), and
    record the prompts it is given."""
    answer = [*tokenizer(" cat").input_ids, tokenizer.convert_tokens_to_ids(EOT), *tokenizer(" dog").input_ids,
              tokenizer.eos_token_id]
    prompts = []

    def generate(self, input_ids, attention_mask=None, streamer=None, return_dict_in_generate=False, **kwargs):
        prompts.append(input_ids)
        answers = torch.tensor([answer] * len(input_ids))
        if streamer is not None:
            streamer.put(input_ids)
            streamer.put_draft(value=answers)
            streamer.put(answers)
            streamer.end()
        sequences = torch.cat([input_ids, answers], dim=1)
        return SimpleNamespace(sequences=sequences) if return_dict_in_generate else sequences

    monkeypatch.setattr(LladaForMaskedDiffusion, "generate", generate)
    return prompts


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_generate_prints_the_answer_up_to_its_end_token(saved_model, fixed_answer, capsys, stream):
    assert main(["generate", saved_model, "the", "cat", "--join", *stream]) == 0
    assert capsys.readouterr().out.strip() == "cat"


def test_chat_shows_and_remembers_the_answer_up_to_its_end_token(saved_model, fixed_answer, tokenizer, capsys,
                                                                 monkeypatch):
    replies = iter(["hello", "and again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["chat", saved_model]) == 0
    out = capsys.readouterr().out
    assert out.count("model>  cat\n") == 2 and "dog" not in out
    second_prompt = tokenizer.decode(fixed_answer[1][0])
    assert f"assistant<|end_header_id|>\n\ncat{EOT}" in second_prompt and "dog" not in second_prompt


def test_dataset_files_that_cannot_be_read_are_one_line(tmp_path, saved_model, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["tune", saved_model, "--dev", str(empty)]) == 1
    assert f"{empty} is empty" in one_line_error(capsys)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "answer": "x"}\n')
    assert main(["tune", saved_model, "--dev", str(latin)]) == 1
    assert f"{latin} is not UTF-8 text" in one_line_error(capsys)


def test_export_refuses_what_it_cannot_write_in_one_line(tmp_path, saved_model, capsys, monkeypatch):
    import builtins
    import sys

    from llada_v_helpers import tiny_processor, write_official_checkpoint

    vision = tmp_path / "llada-v"
    write_official_checkpoint(vision)
    tiny_processor().save_pretrained(vision)
    assert main(["export", str(vision), str(tmp_path / "out"), "--format", "official"]) == 1
    assert "export takes a text LLaDA model" in one_line_error(capsys)
    real_import = builtins.__import__

    def without_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ModuleNotFoundError("No module named 'gguf'", name="gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "llada_hf.export.gguf", raising=False)
    monkeypatch.setattr(builtins, "__import__", without_gguf)
    assert main(["export", saved_model, str(tmp_path / "model.gguf"), "--format", "gguf"]) == 1
    assert "--format gguf needs the `gguf` package: pip install" in one_line_error(capsys)


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors_whole(saved_model, capsys, monkeypatch):
    """User errors are one line; an error raised outside llada-hf's checks (here: inside torch) is a bug and keeps
    its traceback; LLADA_HF_DEBUG=1 shows the traceback of a user error too."""
    import llada_hf_cli

    def broken(*args, **kwargs):
        return torch.ones(2) @ torch.ones(3)  # a RuntimeError deep in torch, as a bug in the engine would raise

    monkeypatch.setattr(LladaForMaskedDiffusion, "generate", broken)
    with pytest.raises(RuntimeError):
        main(["generate", saved_model, "hi"])
    error = ValueError("a check")
    assert not llada_hf_cli.is_user_error(_raised_in_torch())
    try:
        raise error
    except ValueError as caught:
        assert llada_hf_cli.is_user_error(caught) is False  # raised in this test file, not by llada-hf's checks
    monkeypatch.setenv("LLADA_HF_DEBUG", "1")
    with pytest.raises(llada_hf_cli.CliError, match="finite"):
        main(["generate", saved_model, "hi", "--temperature", "nan"])


def _raised_in_torch() -> BaseException:
    try:
        torch.zeros(2).view(3)
    except RuntimeError as error:
        return error
