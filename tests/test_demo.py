"""`llada-hf demo`: the reversal miniature's data, what a run prints and writes, and that its design still separates
a masked diffusion model from an autoregressive one on the held-out pairs."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from llada_hf.demo import (
    DEFAULT,
    LLADA_NAME,
    LLAMA_NAME,
    answer_token_budget,
    demo_tokenizer,
    evaluate,
    invented_pairs,
    make_data,
    reverse_question,
    traced_pair,
    train_both,
    training_rows,
)
from llada_hf.visualization import decoding_order_png


@pytest.fixture(scope="module")
def small_data():
    pairs = invented_pairs(12, seed=0)
    tokenizer = demo_tokenizer(pairs, DEFAULT)
    return pairs, tokenizer


def test_rows_keep_a_before_b_and_ask_only_about_question_pairs(small_data):
    pairs, tokenizer = small_data
    qa_pairs, held_out = pairs[:6], pairs[6:]
    rows = training_rows(pairs, qa_pairs, tokenizer, paraphrases=4, seed=0)
    assert len(rows) == 4 * len(pairs) + 2 * len(qa_pairs)
    for a, b in held_out:
        texts = [row["completion"] for row in rows if f" {a} " in row["completion"] or f" {b}." in row["completion"]]
        assert len(texts) == 4 and all(text.index(a) < text.index(b) for text in texts)
        assert not any(a in row["prompt"] or b in row["prompt"] for row in rows)  # never asked about
    questions = [row for row in rows if row["prompt"] != tokenizer.bos_token]
    assert len(questions) == 2 * len(qa_pairs)
    assert all(row["completion"].startswith(" ") for row in questions)  # the word is the token of the text


def test_every_invented_word_is_one_token(small_data):
    pairs, tokenizer = small_data
    for word in (w for pair in pairs for w in pair):
        assert len(tokenizer(f" {word}", add_special_tokens=False).input_ids) == 1
        assert f"What precedes {word}?" == reverse_question(word)
    assert answer_token_budget(tokenizer, pairs) == 3  # the word, the end of turn and the EOS TRL appends


def test_traced_pair_is_a_right_reverse_answer():
    pairs = [("a", "b"), ("c", "d"), ("e", "f")]
    results = {LLADA_NAME: {"answers": {"reverse": ["x", "c", "e"]}}}
    assert traced_pair(pairs, results, LLADA_NAME) == 1
    results = {LLADA_NAME: {"answers": {"reverse": ["x", "y", "z"]}}}
    assert traced_pair(pairs, results, LLADA_NAME) == 0


def test_decoding_order_png_marks_a_wrong_answer_and_fits_long_labels(tmp_path):
    from PIL import Image

    short = decoding_order_png(str(tmp_path / "short.png"), torch.tensor([1, 0]), ["ab", "cd"], correct=True)
    long = decoding_order_png(str(tmp_path / "long.png"), torch.tensor([1, 0]), [" tafo", "<|eot_id|>" * 3],
                              correct=False, expected="tafo")
    assert Image.open(long).width > Image.open(short).width  # columns widen with the longest label
    many = decoding_order_png(str(tmp_path / "many.png"), torch.arange(12), [f"t{i}" for i in range(12)])
    assert Image.open(many).height > Image.open(short).height


def test_quick_demo_prints_numbered_steps_labelled_progress_and_the_tables(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "llada_hf.cli", "demo", "--quick", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # Step headers 1..6, in order; one labelled progress line per tenth of each model's training, no raw logs
    headers = [int(n) for n in re.findall(r"^\[(\d)/6\]", out, flags=re.M)]
    assert headers == [1, 2, 3, 4, 5, 6]
    for label in ("LLaDA", "Llama"):
        assert len(re.findall(rf"^    {label} +step +\d+/\d+ +loss", out, flags=re.M)) == 10
    assert "{'loss'" not in out and "it/s]" not in result.stderr
    # The trace says whether the traced answer is right; the tables have the forward and reverse columns
    assert re.search(r"LLaDA answers .* \((right|wrong, expected \w+)\); Llama answers", out)
    header = "| model | forward (what follows A?) | reverse (what precedes B?) | answer tokens/s |"
    assert out.count(header) == 2 and "Time taken" in out
    for name in (LLADA_NAME, LLAMA_NAME):
        assert re.search(rf"^\| {re.escape(name)} \| \d+\.\d \| \d+\.\d \| \d+ \|$", out, flags=re.M)
    # Files: results, picture, self-contained model folder; nothing else, no empty folders
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["held_out"]) == {LLADA_NAME, LLAMA_NAME}
    assert "transformers_modules" in summary["example"]["reloaded_module"]
    assert (tmp_path / "decoding_order.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["decoding_order.png", "llada-reversal", "results.json"]
    for name in ("README.md", "config.json", "model.safetensors", "modeling_llada.py", "tokenizer.json"):
        assert (tmp_path / "llada-reversal" / name).is_file(), name
    assert all(files or dirs for _, dirs, files in os.walk(tmp_path))


# The default design with a shorter schedule (150 of the default 200 epochs; about 2.5 minutes on 2 cores). At 150
# epochs the diffusion model's reverse answers on held-out pairs were 80-97 % on every seed tried
# (benchmarks/RESULTS.md, "The demo's design"), so the test pins the separation, not the default's full margin.
SEPARATION = replace(DEFAULT, epochs=150)


def test_the_default_design_still_separates_the_models(tmp_path):
    data = make_data(SEPARATION, seed=0)
    trainer, llama = train_both(data.rows, data.tokenizer, SEPARATION, str(tmp_path), seed=0)
    models = {LLADA_NAME: (trainer.model.eval(), True), LLAMA_NAME: (llama.eval(), False)}
    held_out = data.held_out[: SEPARATION.eval_pairs]
    results = evaluate(models, data.tokenizer, held_out, answer_token_budget(data.tokenizer, data.pairs))
    llada, ar = results[LLADA_NAME], results[LLAMA_NAME]
    print(f"held out: LLaDA {llada['forward']:.1f} / {llada['reverse']:.1f}, "
          f"Llama {ar['forward']:.1f} / {ar['reverse']:.1f}")
    assert ar["forward"] >= 50 and ar["reverse"] <= 10, ar  # the facts reach the forward question only
    assert llada["reverse"] >= ar["reverse"] + 20, (llada["reverse"], ar["reverse"])  # the diffusion model reverses
