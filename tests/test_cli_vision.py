"""`llada-hf generate MODEL "question" --image PATH` and `llada-hf chat MODEL --image PATH` on a tiny saved LLaDA-V:
the printed answers equal the model's own `generate` on the processor's inputs, cut at the end token; a folder with
only a tokenizer (the official layout) gets the official preprocessing sized by its config; bad input is one line."""

import pytest
import torch
from llada_v_helpers import tiny_processor, write_official_checkpoint
from PIL import Image

from transformers import AutoModel

from llada_hf import end_token_ids, truncate_at_eos
from llada_hf.cli import main


SETTINGS = {"max_new_tokens": 8, "steps": 8, "block_length": 4}
FLAGS = ["--max-new-tokens", "8", "--steps", "8", "--block-length", "4"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(llada-hf folder with model + processor, official-layout folder with a tokenizer only, model, processor)."""
    root = tmp_path_factory.mktemp("cli-vision")
    write_official_checkpoint(root / "official")
    processor = tiny_processor()
    processor.tokenizer.save_pretrained(root / "official")
    model = AutoModel.from_pretrained(root / "official").eval()
    model.save_pretrained(root / "saved")
    processor.save_pretrained(root / "saved")
    processor.tokenizer.padding_side = "left"
    return str(root / "saved"), str(root / "official"), model, processor


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two PNG files of different sizes (noise, so the image features differ from row to row)."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for index, (width, height) in enumerate([(70, 40), (30, 50)]):
        pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(index))
        path = folder / f"picture{index}.png"
        Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB").save(path)
        paths.append(str(path))
    return paths


def expected_answers(model, processor, conversations) -> list[str]:
    """What the CLI must print: the model's answers to the processor's inputs, each cut at its end token."""
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
    answers = model.generate(**inputs, **SETTINGS)[:, inputs["input_ids"].shape[1]:]
    ends = end_token_ids(processor.tokenizer, model.generation_config)
    return [text.strip() for text in processor.batch_decode(truncate_at_eos(answers, ends), skip_special_tokens=True)]


def question(text: str, paths: list[str]) -> dict:
    images = [{"type": "image", "image": Image.open(path)} for path in paths]
    return {"role": "user", "content": [*images, {"type": "text", "text": text}]}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("llada-hf: error:"), err
    return lines[-1]


def test_generate_answers_about_an_image(saved, pictures, capsys):
    folder, _, model, processor = saved
    assert main(["generate", folder, "What is in the image?", "--image", pictures[0], *FLAGS]) == 0
    [expected] = expected_answers(model, processor, [[question("What is in the image?", pictures[:1])]])
    assert capsys.readouterr().out == expected + "\n"


def test_several_images_and_several_prompts(saved, pictures, capsys):
    folder, _, model, processor = saved
    prompts = ["Which is larger?", "a cat?"]
    argv = ["generate", folder, *prompts, "--image", pictures[0], "--image", pictures[1], *FLAGS]
    assert main(argv) == 0
    expected = expected_answers(model, processor, [[question(text, pictures)] for text in prompts])
    assert capsys.readouterr().out == "".join(answer + "\n" for answer in expected)


def test_stream_shows_the_same_answer(saved, pictures, capsys):
    folder, _, model, processor = saved
    assert main(["generate", folder, "What is in the image?", "--image", pictures[1], "--stream", *FLAGS]) == 0
    [expected] = expected_answers(model, processor, [[question("What is in the image?", pictures[1:])]])
    assert capsys.readouterr().out.strip() == expected


def test_a_folder_without_a_processor_gets_the_official_preprocessing_from_its_config(saved, pictures, capsys):
    folder, official, _, _ = saved
    argv = ["What is in the image?", "--image", pictures[0], *FLAGS]
    assert main(["generate", official, *argv]) == 0
    from_config = capsys.readouterr().out
    assert main(["generate", folder, *argv]) == 0
    assert from_config == capsys.readouterr().out


def test_chat_shows_the_images_with_the_first_question(saved, pictures, capsys, monkeypatch):
    folder, _, model, processor = saved
    replies = iter(["What is in the image?", "a cat?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["chat", folder, "--image", pictures[0], *FLAGS]) == 0
    messages = [question("What is in the image?", pictures[:1])]
    [first] = expected_answers(model, processor, [messages])
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "a cat?"}]
    [second] = expected_answers(model, processor, [messages])
    out = capsys.readouterr().out
    assert f"model> {first}\n" in out and f"model> {second}\n" in out


def test_a_vision_model_answers_text_only_prompts(saved, capsys):
    folder, _, model, processor = saved
    assert main(["generate", folder, "a cat?", *FLAGS]) == 0
    [expected] = expected_answers(model, processor, [[{"role": "user", "content": "a cat?"}]])
    assert capsys.readouterr().out == expected + "\n"


def test_a_text_model_given_an_image_is_one_line(tmp_path, pictures, capsys, monkeypatch):
    from helpers import tiny_model

    tiny_model().save_pretrained(tmp_path)
    monkeypatch.setattr("transformers.AutoModel.from_pretrained", None)  # refused before any weights are read
    for command in (["generate", str(tmp_path), "hi"], ["chat", str(tmp_path)]):
        assert main([*command, "--image", pictures[0]]) == 1
        assert "is a text model (model_type 'llada'); --image needs a LLaDA-V model" in one_line_error(capsys)


def test_missing_and_unreadable_images_are_one_line(saved, tmp_path, capsys):
    folder = saved[0]
    assert main(["generate", folder, "hi", "--image", str(tmp_path / "nope.png")]) == 1
    assert "nope.png' does not exist" in one_line_error(capsys)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["generate", folder, "hi", "--image", str(tmp_path / "broken.png")]) == 1
    assert "broken.png: not a readable image file" in one_line_error(capsys)
