"""`llada-hf demo --vision --quick`: the LLaDA-V miniature runs end to end (three stages, both models, the PNG)."""

import json

import torch
from PIL import Image

from llada_hf.cli import main
from llada_hf.demo_vision import (
    CANVAS,
    QUICK_VISION,
    STAGES,
    Scene,
    build_tokenizer,
    caption,
    draw,
    final_answer,
    reasoning,
)


def test_pictures_and_reasoning_answers_are_consistent():
    scene = Scene((("red", "square", 0), ("blue", "circle", 2), ("red", "triangle", 1)), (0, 1, 3))
    image = draw(scene)
    assert image.size == (CANVAS, CANVAS) and image.getpixel((7, 7)) == (220, 40, 40)  # the red square, top left
    assert caption(scene) == "red square , blue circle , red triangle"

    class Fixed:  # picks the triangle and the colour red
        def randrange(self, n):
            return 2

        def choice(self, options):
            return "red"

    question, chain, answer = reasoning(scene, Fixed())
    assert question == "how many red shapes are left of the triangle ?"
    assert chain == "left of the triangle : red square , blue circle . answer 1" and answer == "1"
    assert final_answer(chain) == "1" and final_answer("red square") == ""


def test_every_word_is_one_token():  # short answers: "answer 1" is two tokens, not six
    tokenizer = build_tokenizer()
    chain = "left of the triangle : red square , blue circle . answer 1"
    assert len(tokenizer.tokenize(chain)) == len(chain.split()) and len(tokenizer.tokenize("diamond")) == 1


def test_quick_vision_demo_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--vision", "--quick", "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.count("after stage") == 3
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["train_scenes"] == QUICK_VISION.train_scenes
    assert [row["stage"].split()[1] for row in results["table"]] == [f"({stage})" for stage in STAGES]
    assert all(0 <= value <= 100 for row in results["table"] for key, value in row.items() if key != "stage")
    assert Image.open(results["grid"]).size[0] > 0


def test_vision_demo_has_no_large_variant(capsys):
    assert main(["demo", "--vision", "--large"]) == 1
    assert "--large" in capsys.readouterr().err
