"""Choosing decoding settings by measurement: `tune`, its Pareto front, and `llada-hf tune --save`."""

import json
import subprocess
import sys

import pytest
import torch

from llada_hf import DiffusionSFTConfig, DiffusionSFTTrainer
from llada_hf.evaluation.tune import Trial, _candidate_settings, best_setting, front_table, plot_front, tune


WORDS = ["ab", "cd", "ef", "gh"]


def _rows(count, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        word = WORDS[int(torch.randint(0, 4, (1,), generator=g))]
        rows.append({"prompt": f"say {word} =", "completion": f" {word}"})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_tokenizer):
    """A tiny model trained for a few steps to repeat a word (the tuner needs answers that can be right)."""
    from datasets import Dataset
    from helpers import tokenizer_model

    folder = tmp_path_factory.mktemp("tuned")
    model = tokenizer_model(text_tokenizer).train()
    config = DiffusionSFTConfig(output_dir=str(folder / "run"), max_steps=60, per_device_train_batch_size=16,
                                learning_rate=3e-3, report_to="none", logging_strategy="no", save_strategy="no",
                                bf16=False, seed=0)
    trainer = DiffusionSFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(_rows(256, 0)),
                                  processing_class=text_tokenizer)
    trainer.train()
    model = trainer.model.eval()
    model.save_pretrained(folder / "model")
    text_tokenizer.save_pretrained(folder / "model")
    return model, text_tokenizer, folder / "model"


def test_the_search_is_seeded_and_starts_from_the_defaults():
    first, again, other = (_candidate_settings(32, 8, seed) for seed in (0, 0, 1))
    assert first == again and first != other
    assert first[0] == {} and len(first) == 8 and len({json.dumps(s, sort_keys=True) for s in first}) == 8
    assert all(s.get("block_length", 32) <= 32 for s in first)


def test_tune_measures_trials_and_marks_the_front(trained):
    model, tokenizer, _ = trained
    dev = _rows(12, 1)
    results = tune(model, tokenizer, [r["prompt"] for r in dev], [r["completion"] for r in dev], max_new_tokens=8,
                   trials=5, seed=0)
    assert len(results) == 5 and results[0].settings == {}
    again = tune(model, tokenizer, [r["prompt"] for r in dev], [r["completion"] for r in dev], max_new_tokens=8,
                 trials=5, seed=0)
    assert [t.accuracy for t in again] == [t.accuracy for t in results]  # temperature 0: accuracies repeat
    front = [t for t in results if t.on_front]
    assert front and all(
        not (o.accuracy >= t.accuracy and o.tokens_per_second > t.tokens_per_second) for t in front for o in results
    )
    assert "| accuracy % |" in front_table(results)


def test_best_setting_is_the_fastest_within_a_point():
    trials = [Trial({}, 90.0, 10.0, 8), Trial({"a": 1}, 89.5, 50.0, 2), Trial({"b": 1}, 80.0, 90.0, 1)]
    assert best_setting(trials).settings == {"a": 1}


def test_plot_writes_a_png(tmp_path):
    trials = [Trial({}, 90.0, 10.0, 8, True), Trial({"a": 1}, 80.0, 50.0, 2, True)]
    plot_front(trials, str(tmp_path / "front.png"))
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_tune_prints_the_front_and_saves_the_choice(trained, tmp_path):
    _, _, folder = trained
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps(r) for r in _rows(8, 2)))
    result = subprocess.run([sys.executable, "-m", "llada_hf.cli", "tune", str(folder), "--dev", str(dev),
                             "--max-new-tokens", "8", "--trials", "3", "--plot", str(tmp_path / "f.png"), "--save",
                             "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| accuracy % |" in result.stdout and "chosen" in result.stdout
    saved = json.loads((folder / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 8 and (tmp_path / "f.png").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    result = subprocess.run([sys.executable, "-m", "llada_hf.cli", "tune", str(folder), "--dev", str(bad)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "'prompt' and 'completion'" in result.stderr


def test_a_score_may_give_partial_credit(trained):
    model, tokenizer, _ = trained
    dev = _rows(4, 2)
    results = tune(model, tokenizer, [r["prompt"] for r in dev], [r["completion"] for r in dev], max_new_tokens=8,
                   trials=1, score=lambda answer, reference: 0.25)
    assert results[0].accuracy == 25.0
