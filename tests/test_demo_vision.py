"""`llada-hf demo --vision --quick`: the LLaDA-V miniature runs end to end (three stages, both models, the PNG)."""

import dataclasses
import json

import torch
from PIL import Image

from llada_hf.cli import main
from llada_hf.demo_vision import (
    CANVAS,
    COLOURS,
    QUICK_VISION,
    STAGES,
    Scene,
    build_tokenizer,
    caption,
    draw,
    final_answer,
    majority_baseline,
    make_data,
    question,
    reasoning,
)


def test_pictures_questions_and_reasoning_answers_are_consistent():
    scene = Scene("square", "red", "blue", (4, 4, 48, 48))
    image = draw(scene)
    assert image.size == (CANVAS, CANVAS)
    assert image.getpixel((26, 26)) == COLOURS["red"] and image.getpixel((1, 1)) == COLOURS["blue"]
    assert caption(scene) == "red square on blue"

    class Fixed:  # asks about the background's colour
        def random(self):
            return 0.9

        def choice(self, options):
            return "blue"

    assert question(scene, "yes / no", Fixed()) == ("is the shape blue ?", "no")
    assert question(scene, "background", Fixed()) == ("what colour is the background ?", "blue")
    q, chain, answer = reasoning(scene)
    assert q == "which colour is missing ?"
    assert chain == "shape : red . background : blue . answer green" and answer == "green"
    assert final_answer(chain) == "green" and final_answer("red square") == ""


def test_answers_are_balanced_so_guessing_scores_low():
    from collections import Counter, defaultdict

    data = make_data(dataclasses.replace(QUICK_VISION, train_scenes=300, test_scenes=300), seed=1)
    answers = defaultdict(Counter)  # per question asked in training, how often each answer
    for stage in ("instruct", "reasoning"):
        for row in data["train"][stage]:
            answers[row["prompt"][-1]["content"]][final_answer(row["completion"][0]["content"]) or
                                                  row["completion"][0]["content"]] += 1
    assert len(answers) == 6  # the 2 colour questions, "is the shape red / green / blue ?", the reasoning one
    assert all(max(counts.values()) < 0.6 * sum(counts.values()) for counts in answers.values())
    majority = majority_baseline(data)
    assert majority["caption"] < 15 and majority["question"] < 50 and majority["reasoning"] < 45


def test_every_word_is_one_token():  # short answers: "answer green" is two tokens, not six
    tokenizer = build_tokenizer()
    chain = "shape : red . background : blue . answer green"
    for text in (chain, "which colour is missing ?", "is the shape red ?", "what shape is it ?", "red circle on blue"):
        assert len(tokenizer.tokenize(text)) == len(text.split())
    assert len(tokenizer.tokenize("triangle")) == 1


def test_quick_vision_demo_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--vision", "--quick", "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.count("after stage") == 3 and "majority answer" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["train_scenes"] == QUICK_VISION.train_scenes
    assert [row["stage"].split()[1] for row in results["table"]] == [f"({stage})" for stage in STAGES]
    assert all(0 <= value <= 100 for row in results["table"] for key, value in row.items() if key != "stage")
    assert all(0 <= results["majority"][key] <= 100 for key in ("caption", "question", "reasoning"))
    assert Image.open(results["grid"]).size[0] > 0


def test_vision_demo_has_no_large_variant(capsys):
    assert main(["demo", "--vision", "--large"]) == 1
    assert "--large" in capsys.readouterr().err
