"""The main job: the LLaDA paper's reversal experiment in miniature, end to end, on data made here.

A masked diffusion model answers "what precedes B?" about as well as "what follows A?"; an autoregressive
model trained on the same text suffers the reversal curse. The demo:

1. makes one-to-one pairs of invented words (deterministic, seeded); each pair is written as four plain-text
   sentences, always with A before B ("After A comes B.", ...); forward ("What follows A?") and reverse ("What
   precedes B?") questions are trained, mixed with the text from the start, for half of the pairs; the other half
   (the held-out pairs) is only ever seen as text;
2. trains a byte-level BPE tokenizer with LLaDA's special tokens and chat template (every invented word is one
   token);
3. trains a small `LladaForMaskedDiffusion` with `DiffusionSFTTrainer` and, as the yardstick (in a second
   process, at the same time), a `LlamaForCausalLM` of the same size with TRL's `SFTTrainer`, on the same rows
   with the same optimisation; each prints one labelled progress line per tenth of its training;
4. asks both models forward and reverse questions about the held-out pairs, with the same token budget;
5. shows one answer being denoised (terminal drafts and a PNG of the decoding order);
6. saves the diffusion model with its model card and reloads it in a fresh process with
   `trust_remote_code=True`, where `llada_hf` cannot be imported.

Why this design (benchmarks/RESULTS.md, "The demo's design"): the two models only differ on the held-out pairs
when both can carry a fact from text into the question format at all, which at this size needs single-token
entities (a word is the same token in the text and in the question), several paraphrases of each fact and
question rows mixed in from the start; the diffusion model also needs answers without EOS padding (a batch mixes
5-token text rows with 18-token question rows, and EOS padding made most of each text row's answer EOS).

Run it with `llada-hf demo` (`--quick` for a < 1 minute smoke run, `--large` for more pairs and a larger model).
"""

import json
import math
import operator
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .quiet import quiet_libraries
from .tokenization import EOS, EOT, model_token_ids, train_tokenizer


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run."""

    pairs: int = 120  # invented word pairs
    # pairs whose forward and reverse questions are trained: with 3 in 4 (not 1 in 2) the diffusion model learns to
    # answer from what it read instead of memorising the trained questions, on every seed and kernel tried
    question_fraction: float = 0.75
    paraphrases: int = 4  # plain-text sentences per pair (the first `paraphrases` of TEXT_TEMPLATES)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    vocab_size: int = 4096  # upper bound for the tokenizer; it stops when every word is one token
    epochs: int = 200  # the cosine schedule still has a high learning rate when the diffusion model generalises
    batch_size: int = 32
    # 1e-3: at 2e-3 both models memorise more and transfer less to the held-out questions (benchmarks/RESULTS.md)
    learning_rate: float = 1e-3
    eval_pairs: int = 60  # held-out pairs asked about
    threads: int = 1  # tiny models train fastest on one thread (no per-op synchronisation)


QUICK = DemoSettings(pairs=48, hidden_size=32, heads=2, epochs=2, batch_size=16, eval_pairs=8)
DEFAULT = DemoSettings()
LARGE = DemoSettings(pairs=240, hidden_size=96, layers=3, eval_pairs=120)

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

# Paraphrases of one fact, A always before B, each word after a space (so that it is the same token everywhere).
TEXT_TEMPLATES = (" {a} {b}.", "After {a} comes {b}.", "The word {a} is followed by {b}.", "First {a}, then {b}.")


# ---- 1. data -----------------------------------------------------------------------------------------


def invented_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` one-to-one pairs of distinct invented two-syllable words.

    Example:
        ```python
        >>> from llada_hf.demo import invented_pairs
        >>> invented_pairs(2, seed=0)
        [('rada', 'buse'), ('ruga', 'make')]
        ```
    """
    rng = random.Random(seed)
    words = sorted({a + b for a in SYLLABLES for b in SYLLABLES})
    chosen = rng.sample(words, 2 * count)
    return list(zip(chosen[:count], chosen[count:]))


def forward_question(a: str) -> str:
    return f"What follows {a}?"


def reverse_question(b: str) -> str:
    return f"What precedes {b}?"


def plain_texts(a: str, b: str, paraphrases: int = 1) -> list[str]:
    """The fact "A then B" written as the first `paraphrases` of TEXT_TEMPLATES.

    Example:
        ```python
        >>> from llada_hf.demo import plain_texts
        >>> plain_texts("lomi", "vuku", 2)
        [' lomi vuku.', 'After lomi comes vuku.']
        ```
    """
    return [template.format(a=a, b=b) for template in TEXT_TEMPLATES[:paraphrases]]


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def training_rows(pairs, qa_pairs, tokenizer, paraphrases: int = 1, seed: int | None = None) -> list[dict[str, str]]:
    """prompt/completion rows: every pair as plain text (`paraphrases` sentences, prompt = BOS), and questions both
    ways for `qa_pairs`, whose answers start with a space (the word is then the same token as in the text).
    With a `seed` the rows are shuffled, so that text and questions are mixed from the start."""
    rows = [{"prompt": tokenizer.bos_token, "completion": text} for a, b in pairs for text in plain_texts(a, b,
                                                                                                          paraphrases)]
    for a, b in qa_pairs:
        rows.append({"prompt": chat_prompt(tokenizer, forward_question(a)), "completion": f" {b}{EOT}"})
        rows.append({"prompt": chat_prompt(tokenizer, reverse_question(b)), "completion": f" {a}{EOT}"})
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows


def demo_tokenizer(pairs, settings: DemoSettings):
    """A BPE tokenizer trained on the demo's texts and questions, in which every invented word is one token."""
    texts = [text for a, b in pairs for text in plain_texts(a, b, settings.paraphrases)]
    questions = [forward_question(a) for a, _ in pairs] + [reverse_question(b) for _, b in pairs]
    words = [f" {b}" for _, b in pairs] + [f" {a}" for a, _ in pairs]
    tokenizer = train_tokenizer(texts + questions + words, vocab_size=settings.vocab_size)
    split = [word for word in words if len(tokenizer(word, add_special_tokens=False).input_ids) != 1]
    if split:
        raise ValueError(f"{len(split)} invented words are not single tokens (e.g. {split[0]!r}): raise "
                         f"`vocab_size` (now {settings.vocab_size}).")
    return tokenizer


@dataclass
class DemoData:
    """What the demo trains on: the pairs, split into question pairs and held-out pairs, the tokenizer and the
    training rows."""

    pairs: list[tuple[str, str]]
    qa_pairs: list[tuple[str, str]]
    held_out: list[tuple[str, str]]
    tokenizer: object
    rows: list[dict[str, str]]


def make_data(settings: DemoSettings, seed: int) -> DemoData:
    """The pairs, the tokenizer and the training rows of one demo run."""
    pairs = invented_pairs(settings.pairs, seed)
    split = int(len(pairs) * settings.question_fraction)
    qa_pairs, held_out = pairs[:split], pairs[split:]
    tokenizer = demo_tokenizer(pairs, settings)
    rows = training_rows(pairs, qa_pairs, tokenizer, settings.paraphrases, seed)
    return DemoData(pairs, qa_pairs, held_out, tokenizer, rows)


# ---- 3. models and training -----------------------------------------------------------------------


def model_dimensions(settings: DemoSettings, tokenizer) -> dict:
    """The dimensions and token ids both models share."""
    return dict(hidden_size=settings.hidden_size, intermediate_size=settings.hidden_size * 3,
                num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                num_key_value_heads=settings.heads, max_position_embeddings=128, rms_norm_eps=1e-5,
                tie_word_embeddings=False, rope_theta=10000.0, **model_token_ids(tokenizer))


def build_llada(settings: DemoSettings, tokenizer, seed: int):
    from .configuration_llada import LladaConfig
    from .modeling_llada import LladaForMaskedDiffusion

    torch.manual_seed(seed)
    return LladaForMaskedDiffusion(LladaConfig(**model_dimensions(settings, tokenizer)))


def build_llama(settings: DemoSettings, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = model_dimensions(settings, tokenizer)
    dims.pop("mask_token_id")
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**dims))


def training_steps(settings: DemoSettings, rows: int) -> int:
    return math.ceil(rows / settings.batch_size) * settings.epochs


def training_arguments(settings: DemoSettings, seed: int, rows: int) -> dict:
    """The same optimisation for both models; a log (and a progress line) every tenth of the training."""
    return dict(num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
                learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=10,
                weight_decay=0.0, logging_steps=max(1, training_steps(settings, rows) // 10), save_strategy="no",
                report_to="none", seed=seed, bf16=False, max_length=64, dataloader_num_workers=0,
                activation_checkpointing=False, dataloader_pin_memory=False, disable_tqdm=True)


def progress_lines(label: str):
    """A `TrainerCallback` that prints one line per log, labelled with the model's name (both models train at the
    same time, so their lines interleave)."""
    from transformers import TrainerCallback

    class ProgressLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.printed = time.perf_counter(), 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            # logging_steps is a tenth of the steps rounded down: when it does not divide them, an 11th log comes
            if logs and "loss" in logs and self.printed < 10:
                self.printed += 1
                print(f"    {label:<7} step {state.global_step:>5}/{state.max_steps}  loss {float(logs['loss']):6.3f}"
                      f"  {time.perf_counter() - self.started:4.0f} s", flush=True)

    return ProgressLines()


def quiet_trainer(trainer, label: str):
    """Replace the trainer's raw log printing by labelled progress lines; return the trainer."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_lines(label))
    return trainer


def train_llada(rows, tokenizer, settings: DemoSettings, scratch_dir: str, seed: int):
    """Train the diffusion model with DiffusionSFTTrainer; return the trainer.

    Answers are not padded with EOS (`pad_answers_with_eos=False`): every answer here has a known length (a sentence,
    or one word and the end of turn), and a batch mixes 5-token text rows with 18-token question rows, so EOS padding
    would make most of each text row's answer EOS; with it the model learnt the padding, not the words
    (benchmarks/RESULTS.md). The autoregressive yardstick does not score padding either.
    """
    from datasets import Dataset

    from .trainers import DiffusionSFTConfig, DiffusionSFTTrainer

    args = DiffusionSFTConfig(output_dir=os.path.join(scratch_dir, "trainer-llada"), pad_answers_with_eos=False,
                              **training_arguments(settings, seed, len(rows)))
    trainer = DiffusionSFTTrainer(model=build_llada(settings, tokenizer, seed), args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    quiet_trainer(trainer, "LLaDA").train()
    return trainer


def train_llama(rows, tokenizer_dir: str, settings: DemoSettings, scratch_dir: str, seed: int) -> None:
    """Train the autoregressive yardstick with TRL's SFTTrainer and save it to `scratch_dir`/llama.

    Runs in its own process (one thread), beside the diffusion model's training: two cores, two models.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from transformers import AutoTokenizer

    quiet_libraries()
    torch.set_num_threads(settings.threads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = SFTConfig(output_dir=os.path.join(scratch_dir, "trainer-llama"), **training_arguments(settings, seed,
                                                                                                   len(rows)))
    trainer = SFTTrainer(model=build_llama(settings, tokenizer, seed), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    quiet_trainer(trainer, "Llama").train()
    trainer.model.save_pretrained(os.path.join(scratch_dir, "llama"))


def train_both(rows, tokenizer, settings: DemoSettings, scratch_dir: str, seed: int):
    """Train LLaDA here and Llama in a second process at the same time; return (LLaDA trainer, Llama).

    `scratch_dir` receives the trainers' working folders, the tokenizer handed to the second process and the
    trained Llama; the demo passes a temporary folder.
    """
    import multiprocessing

    from transformers import LlamaForCausalLM

    tokenizer_dir = os.path.join(scratch_dir, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    llama_job = multiprocessing.get_context("spawn").Process(
        target=train_llama, args=(rows, tokenizer_dir, settings, scratch_dir, seed))
    llama_job.start()
    diffusion = train_llada(rows, tokenizer, settings, scratch_dir, seed)
    llama_job.join()
    if llama_job.exitcode != 0:
        raise RuntimeError(f"Training the autoregressive yardstick failed (exit code {llama_job.exitcode}).")
    return diffusion, LlamaForCausalLM.from_pretrained(os.path.join(scratch_dir, "llama"))


# ---- 4. evaluation -------------------------------------------------------------------------------


def answer_token_budget(tokenizer, pairs) -> int:
    """The trained answer's length: the longest word (a space and the word, as trained), its end-of-turn token and
    the EOS that TRL appends to every completion. The diffusion model fills a canvas of exactly this many masks; a
    shorter one is an answer shape it never saw (with one position too few it put the end of turn where the word
    belongs on some seeds and CPUs: the empty answers of earlier runs)."""
    word = max(len(tokenizer(f" {word}", add_special_tokens=False).input_ids) for pair in pairs for word in pair)
    return word + 2


def clean_answer(text: str) -> str:
    """The answer word: text before the end of turn, without EOS padding or a trailing full stop."""
    return text.split(EOT)[0].replace(EOS, "").split(".")[0].strip()


def ask(model, tokenizer, questions: list[str], budget: int, diffusion: bool) -> tuple[list[str], float]:
    """Answer `questions` with greedy decoding; return the answers and the answer tokens per second."""
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    start = time.perf_counter()
    with torch.no_grad():
        if diffusion:
            out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=budget,
                                 steps=budget, block_length=budget)
        else:
            out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=budget,
                                 do_sample=False, eos_token_id=[eot], pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    answers = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=False)
    return [clean_answer(a) for a in answers], len(questions) * budget / seconds


def evaluate(models: dict, tokenizer, pairs, budget: int, match: Callable[[str, str], bool] = operator.eq) -> dict:
    """Forward and reverse accuracy (%) of each model on `pairs`: answers for which `match(answer, expected)`
    holds (default: exact match); also the answer tokens/s and every answer each way (`answers`)."""
    results = {}
    for name, (model, diffusion) in models.items():
        forward, fwd_speed = ask(model, tokenizer, [forward_question(a) for a, _ in pairs], budget, diffusion)
        reverse, rev_speed = ask(model, tokenizer, [reverse_question(b) for _, b in pairs], budget, diffusion)
        results[name] = {
            "forward": 100 * sum(match(x, b) for x, (_, b) in zip(forward, pairs)) / len(pairs),
            "reverse": 100 * sum(match(x, a) for x, (a, _) in zip(reverse, pairs)) / len(pairs),
            "tokens_per_second": (fwd_speed + rev_speed) / 2,
            "answers": {"forward": forward, "reverse": reverse},
        }
    return results


def results_table(results: dict) -> str:
    lines = ["| model | forward (what follows A?) | reverse (what precedes B?) | answer tokens/s |",
             "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['forward']:.1f} | {r['reverse']:.1f} | {r['tokens_per_second']:.0f} |")
    return "\n".join(lines)


# ---- 5. show one answer being decoded --------------------------------------------------------------


def traced_pair(pairs, results: dict, diffusion_name: str) -> int:
    """Index of the first pair whose reverse question the diffusion model answered right (0 when none was)."""
    answers = results[diffusion_name]["answers"]["reverse"]
    return next((i for i, (answer, (a, _)) in enumerate(zip(answers, pairs)) if answer == a), 0)


def show_decoding(model, tokenizer, question: str, expected: str, budget: int, png_path: str) -> dict:
    """Decode one answer step by step; return its drafts, the answer and whether it is right; draw the decoding
    order (a wrong answer is marked in the picture)."""
    from .visualization import decoding_order_png, draft_lines

    ids = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=budget, steps=budget, block_length=budget,
                             return_dict_in_generate=True, output_history=True)
    answer_ids = out.sequences[0, ids.shape[1]:]
    answer = clean_answer(tokenizer.decode(answer_ids))
    tokens = [tokenizer.decode([t]) for t in answer_ids.tolist()]
    decoding_order_png(png_path, out.commit_step[0], tokens, title=f"LLaDA: {question}", correct=answer == expected,
                       expected=expected)
    drafts = draft_lines(out.history, ids.shape[1], tokenizer, model.config.mask_token_id)
    return {"question": question, "expected": expected, "answer": answer, "right": answer == expected,
            "drafts": drafts}


# ---- 6. publish locally and reload without llada_hf --------------------------------------------------


DEMO_REPO_ID = "your-name/llada-reversal-demo"  # where the card's usage snippet expects it once pushed

RELOAD_SCRIPT = """
import sys
sys.modules["llada_hf"] = None  # the folder must be self-contained
import torch
from transformers import AutoModel, AutoTokenizer
folder, question = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
out = model.generate(ids)
print(type(model).__module__ + "|" + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
"""


def save_with_card(trainer, tokenizer, folder: str, budget: int) -> str:
    """Save the trained diffusion model, its tokenizer, generation settings and model card into `folder`."""
    from .hub_card import render_model_card

    model = trainer.model
    model.generation_config.max_new_tokens = budget
    model.generation_config.steps = budget
    model.generation_config.block_length = budget
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card = render_model_card(model, repo_id=DEMO_REPO_ID, tokenizer=tokenizer, trainer=trainer,
                             description="A tiny LLaDA trained by `llada-hf demo` on invented word pairs (the "
                                         "reversal experiment in miniature).")
    card.save(os.path.join(folder, "README.md"))
    return folder


def reload_in_fresh_process(folder: str, question: str) -> tuple[str, str]:
    """Load `folder` with trust_remote_code=True where llada_hf cannot be imported; answer `question`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, folder, question], capture_output=True,
                            text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"Reloading {folder} without llada_hf failed:\n{result.stderr[-2000:]}")
    module, answer = result.stdout.strip().splitlines()[-1].split("|", 1)
    return module, clean_answer(answer)


# ---- the whole job -----------------------------------------------------------------------------------

LLADA_NAME, LLAMA_NAME = "LLaDA (masked diffusion)", "Llama (autoregressive)"


def step(number: int, text: str) -> None:
    """Print a numbered step header."""
    print(f"[{number}/6] {text}", flush=True)


def run_demo(output_dir: str = "outputs/demo", seed: int = 0, settings: DemoSettings = DEFAULT) -> dict:
    """Run the reversal demo end to end and return its results (also written to `results.json`).

    Example:
        ```python
        >>> from llada_hf.demo import QUICK, run_demo
        >>> # results = run_demo("outputs/demo-quick", settings=QUICK)   # under a minute on a laptop CPU
        ```
    """
    started = time.perf_counter()
    quiet_libraries()
    os.makedirs(output_dir, exist_ok=True)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(seed)
    # 1-2. Data and tokenizer
    data = make_data(settings, seed)
    pairs, qa_pairs, held_out, tokenizer, rows = data.pairs, data.qa_pairs, data.held_out, data.tokenizer, data.rows
    example_text = plain_texts(*pairs[0], settings.paraphrases)[-1]
    step(1, f"{len(pairs)} invented pairs A-B, each seen as {settings.paraphrases} plain-text sentences with A before "
            f"B (e.g. \"{example_text}\"); questions both ways trained for "
            f"{len(qa_pairs)} pairs, {len(held_out)} held out: {len(rows)} training rows")
    step(2, f"BPE tokenizer of {len(tokenizer)} tokens (every invented word is one token)")
    # 3. Train
    step(3, f"training LLaDA (DiffusionSFTTrainer) and, in a second process, Llama (SFTTrainer), same rows and "
            f"settings: {settings.epochs} epochs, {training_steps(settings, len(rows))} steps each")
    with tempfile.TemporaryDirectory(prefix="llada-demo-") as scratch:
        diffusion_trainer, llama = train_both(rows, tokenizer, settings, scratch, seed)
    llada, llama = diffusion_trainer.model.eval(), llama.eval()
    # 4. Evaluate on the held-out pairs (seen only as plain text)
    budget = answer_token_budget(tokenizer, pairs)
    eval_pairs = held_out[: settings.eval_pairs]
    step(4, f"asking both models about {len(eval_pairs)} held-out pairs (and, as a check, about pairs whose questions "
            f"were trained), {budget} answer tokens each")
    models = {LLADA_NAME: (llada, True), LLAMA_NAME: (llama, False)}
    results = evaluate(models, tokenizer, eval_pairs, budget)
    trained = evaluate(models, tokenizer, qa_pairs[: settings.eval_pairs], budget)
    # 5. Show one answer being decoded: a held-out reverse question
    traced = traced_pair(eval_pairs, results, LLADA_NAME)
    a, b = eval_pairs[traced]
    png = os.path.join(output_dir, "decoding_order.png")
    step(5, "one held-out reverse question, denoised by LLaDA step by step:")
    example = show_decoding(llada, tokenizer, reverse_question(b), a, budget, png)
    example["llama_answer"] = results[LLAMA_NAME]["answers"]["reverse"][traced]
    print_trace(example)
    # 6. Publish locally and reload in a fresh process
    folder = os.path.join(output_dir, "llada-reversal")
    step(6, f"saving LLaDA with its model card to {folder} and reloading it where llada_hf cannot be imported")
    save_with_card(diffusion_trainer, tokenizer, folder, budget)
    example["reloaded_module"], example["reloaded_answer"] = reload_in_fresh_process(folder, example["question"])

    summary = {
        "settings": asdict(settings), "seed": seed, "held_out": results, "trained_questions": trained,
        "example": example, "outputs": {"model": folder, "decoding_order_png": png},
        "seconds": time.perf_counter() - started,
    }
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    print_summary(summary)
    return summary


def verdict(answer: str, expected: str) -> str:
    return "right" if answer == expected else f"wrong, expected {expected}"


def print_trace(example: dict) -> None:
    """The drafts of the traced answer, and both models' answers to the same question."""
    print(f"    Q: {example['question']}  (expected: {example['expected']})")
    for number, line in enumerate(example["drafts"]):
        print(f"    step {number}: {line}")
    print(f"    LLaDA answers \"{example['answer']}\" ({verdict(example['answer'], example['expected'])}); "
          f"Llama answers \"{example['llama_answer']}\" ({verdict(example['llama_answer'], example['expected'])})")


def print_summary(summary: dict) -> None:
    example = summary["example"]
    print(textwrap.dedent(f"""
        ================================ llada-hf demo ================================
        Held-out pairs, seen only as plain text with A before B (exact-match accuracy, %):
        {{table}}
        Pairs whose questions were trained (sanity check):
        {{trained}}
        Reloaded without llada_hf ({example['reloaded_module']}): "{example['reloaded_answer']}"
        Model folder (weights, code, card): {summary['outputs']['model']}
        Decoding-order picture:            {summary['outputs']['decoding_order_png']}
        Time taken: {summary['seconds']:.0f} s
        ===============================================================================""").format(
        table=results_table(summary["held_out"]), trained=results_table(summary["trained_questions"])))
