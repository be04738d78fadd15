"""`llada-hf demo --vision --quick`: the LLaDA-V miniature runs end to end (three stages, both models, the PNG)."""

import dataclasses
import json

import torch
from PIL import Image

from llada_hf.cli import main
from llada_hf.demo_vision import (
    CANVAS,
    COLOURS,
    DEFAULT_VISION,
    QUICK_VISION,
    STAGES,
    Scene,
    answer_canvases,
    build_models,
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


def test_diffusion_canvases_are_the_trained_answer_lengths():
    """LLaDA-V is asked on exactly the answer shape it was trained on (issue 24): the caption and the newline of the
    plain template (no EOS, as the official `llada_plain`), the word and the end of turn, the 10-word chain and the
    end of turn."""
    data = make_data(dataclasses.replace(QUICK_VISION, train_scenes=60), seed=2)
    tokenizer = build_tokenizer()
    _, processor, _, _ = build_models(QUICK_VISION, tokenizer, seed=0)
    assert answer_canvases(data, processor) == {"caption": 5, "question": 2, "reasoning": 11}


def test_one_word_answers_are_trained_fully_masked_and_chains_half(tmp_path, monkeypatch):
    """The noise floor of each stage reaches LLaDA-V's trainer (issue 24): LLaDA's 1e-3 for the captions, the whole
    answer masked for stage 2's one-word answers (with 1e-3, three seeds of four never learnt which colour is the
    shape's), p in [0.5, 1] for stage 3's chains (fully masked, they fell apart); answers never EOS-padded."""
    from llada_hf.demo_vision import train_stage
    from llada_hf.trainers import DiffusionSFTTrainer

    seen = []
    monkeypatch.setattr(DiffusionSFTTrainer, "train", lambda self: seen.append(
        (self.args.stage, self.args.time_epsilon, self.args.pad_answers_with_eos)))
    settings = dataclasses.replace(QUICK_VISION, train_scenes=4)
    data = make_data(settings, seed=0)
    llada_v, processor, _, _ = build_models(settings, build_tokenizer(), seed=0)
    for index, stage in enumerate(STAGES):
        train_stage(llada_v, processor, data, stage, index, settings, str(tmp_path), autoregressive=False)
    assert seen == [("projector", 1e-3, False), ("instruct", 0.999, False), ("reasoning", 0.5, False)]
    assert DEFAULT_VISION.time_epsilon == QUICK_VISION.time_epsilon == (1e-3, 0.999, 0.5)


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
    assert results["canvases"] == {"caption": 5, "question": 2, "reasoning": 11}
    assert [row["stage"].split()[1] for row in results["table"]] == [f"({stage})" for stage in STAGES]
    assert all(0 <= value <= 100 for row in results["table"] for key, value in row.items() if key != "stage")
    assert all(0 <= results["majority"][key] <= 100 for key in ("caption", "question", "reasoning"))
    assert Image.open(results["grid"]).size[0] > 0


def test_vision_demo_has_no_large_variant(capsys):
    assert main(["demo", "--vision", "--large"]) == 1
    assert "--large" in capsys.readouterr().err
