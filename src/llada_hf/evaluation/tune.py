"""Pick decoding settings by measurement: accuracy against answer tokens per second on a small dev set.

`tune` tries the default `generate` and a seeded random sample of other settings (remasking strategy, block
length, steps, parallel decoding by threshold or entropy bound, key/value cache, bounded canvas, early exit),
scores each on the dev set, and returns every trial with the Pareto front marked (no other trial is both more
accurate and faster). `llada-hf tune` prints the front, draws it, and can save the chosen setting into the model's
`generation_config.json`.
"""

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..decoding_llada import left_pad
from ..streaming_llada import end_token_ids, truncate_at_eos


# The search space. Values that do not fit an answer length are dropped per run (see `_candidate_settings`).
SEARCH_SPACE: dict[str, tuple] = {
    "remasking": ("low_confidence", "margin", "entropy"),
    "block_length": (8, 16, 32, 64),
    "steps_per_token": (1.0, 0.5, 0.25),  # steps = max_new_tokens * this
    "confidence_threshold": (None, 0.95, 0.9, 0.8, 0.7),
    "entropy_bound": (None, 0.5, 1.0),
    "kv_cache": (None, "prefix", "dual"),
    "canvas_tail": (None, 32),
    "early_exit": (False, True),
}


@dataclass
class Trial:
    """One measured setting: the `generate` keyword arguments, accuracy (%, the mean score), answer tokens per
    second (up to the end token), forward passes per batch, and whether it is on the Pareto front."""

    settings: dict
    accuracy: float
    tokens_per_second: float
    nfe: float
    on_front: bool = field(default=False)


def exact_match(answer: str, reference: str) -> bool:
    """The default score: the stripped answer equals the stripped reference."""
    return answer.strip() == reference.strip()


def tune(
    model,
    tokenizer,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    max_new_tokens: int = 64,
    trials: int = 12,
    score: Callable[[str, str], bool | float] = exact_match,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Trial]:
    """Measure the default setting and `trials - 1` seeded random others on a dev set; mark the Pareto front.

    The settings tried (and so the accuracies, at temperature 0) depend only on `seed`; the speeds are wall-clock
    measurements of this machine. `score(answer, reference)` returns True/False or partial credit in [0, 1]
    (e.g. the share of right tokens); accuracy is its mean, in %.

    Example:
        ```python
        >>> from llada_hf.evaluation.tune import tune, best_setting
        >>> # results = tune(model, tokenizer, dev_prompts, dev_answers, max_new_tokens=32, trials=8)
        >>> # best_setting(results)  ->  the fastest setting within 1 point of the best accuracy
        ```
    """
    if len(prompts) != len(references) or not prompts:
        raise ValueError(f"Pass one reference per prompt (got {len(prompts)} prompts, {len(references)} references).")
    if trials < 1:
        raise ValueError(f"`trials` must be at least 1, got {trials}.")
    results = []
    for settings in _candidate_settings(max_new_tokens, trials, seed):
        results.append(measure_setting(model, tokenizer, prompts, references, settings, score=score,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens))
    _mark_front(results)
    return results


def best_setting(results: list[Trial], tolerance: float = 1.0) -> Trial:
    """The fastest trial whose accuracy is within `tolerance` points of the best accuracy."""
    best_accuracy = max(trial.accuracy for trial in results)
    eligible = [trial for trial in results if trial.accuracy >= best_accuracy - tolerance]
    return max(eligible, key=lambda trial: trial.tokens_per_second)


def front_table(results: list[Trial], every_trial: bool = False) -> str:
    """The Pareto front (with `every_trial=True`: every trial, in its order) as a Markdown table, most accurate
    first."""
    lines = ["| accuracy % | answer tok/s | NFE | settings |", "|---|---|---|---|"]
    shown = results if every_trial else sorted((t for t in results if t.on_front),
                                               key=lambda t: (-t.accuracy, -t.tokens_per_second))
    for trial in shown:
        settings = ", ".join(f"{key}={_shown(value)}" for key, value in trial.settings.items()) or "defaults"
        lines.append(f"| {trial.accuracy:.1f} | {trial.tokens_per_second:.1f} | {trial.nfe:.1f} | {settings} |")
    return "\n".join(lines)


def _shown(value) -> str:
    """A setting's value in a table: a learned policy's numbers are summed up as 'learned'."""
    return "learned" if isinstance(value, dict) else str(value)


def plot_front(results: list[Trial], path: str) -> None:
    """Accuracy against answer tokens/s for every trial, the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.scatter([t.tokens_per_second for t in results], [t.accuracy for t in results], color="0.6", label="trial")
    front = sorted((t for t in results if t.on_front), key=lambda t: t.tokens_per_second)
    axes.plot([t.tokens_per_second for t in front], [t.accuracy for t in front], "o-", color="C0",
              label="Pareto front")
    axes.set_xlabel("answer tokens / s")
    axes.set_ylabel("accuracy (%)")
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ...
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _candidate_settings(max_new_tokens: int, trials: int, seed: int) -> list[dict]:
    """The default (empty) setting first, then distinct random draws from `SEARCH_SPACE` that fit the length."""
    rng = random.Random(seed)
    seen, candidates = set(), [{}]
    for _ in range(trials * 50):
        if len(candidates) == trials:
            break
        draw = {key: rng.choice(values) for key, values in SEARCH_SPACE.items()}
        settings = _fit(draw, max_new_tokens)
        key = tuple(sorted(settings.items()))
        if settings and key not in seen:
            seen.add(key)
            candidates.append(settings)
    return candidates


def _fit(draw: dict, max_new_tokens: int) -> dict:
    """Turn a draw into `generate` keyword arguments valid for this answer length (defaults left out)."""
    block_length = min(draw["block_length"], max_new_tokens)
    blocks = -(-max_new_tokens // block_length)
    steps = max(blocks, int(max_new_tokens * draw["steps_per_token"]))
    settings = {"remasking": draw["remasking"], "block_length": block_length, "steps": steps}
    for key in ("confidence_threshold", "entropy_bound", "kv_cache", "canvas_tail", "early_exit"):
        if draw[key] not in (None, False):
            settings[key] = draw[key]
    if settings == {"remasking": "low_confidence", "block_length": max_new_tokens, "steps": max_new_tokens}:
        return {}  # the default
    return settings


@torch.no_grad()
def measure_setting(model, tokenizer, prompts: Sequence[str], references: Sequence[str], settings: dict, *,
                    score: Callable[[str, str], bool | float] = exact_match, batch_size: int = 8,
                    max_new_tokens: int = 64) -> Trial:
    """One trial: `generate(**settings)` on the dev set, batch by batch; accuracy (%, the mean `score`), answer tokens
    (up to the end token) per second of `generate`, forward passes per batch.

    Example:
        ```python
        >>> from llada_hf.evaluation.tune import measure_setting
        >>> # trial = measure_setting(model, tokenizer, prompts, answers, {"confidence_threshold": 0.9})
        >>> # trial.accuracy, trial.tokens_per_second
        ```
    """
    ends = end_token_ids(tokenizer, model.generation_config)
    correct, answer_tokens, forwards, batches, seconds = 0, 0, 0, 0, 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in chunk]
        input_ids, attention_mask = left_pad(rows, model.generation_config.pad_token_id or 0)
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        began = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, return_dict_in_generate=True,
                             max_new_tokens=max_new_tokens, **settings)
        seconds += time.perf_counter() - began
        answers = truncate_at_eos(out.sequences[:, input_ids.shape[1] :], ends)
        for answer, reference in zip(answers, references[start : start + batch_size]):
            correct += float(score(tokenizer.decode(answer, skip_special_tokens=True), reference))
            answer_tokens += len(answer)
        forwards += out.nfe
        batches += 1
    return Trial(settings, 100.0 * correct / len(prompts), answer_tokens / max(seconds, 1e-9), forwards / batches)


def _mark_front(results: list[Trial]) -> None:
    for trial in results:
        trial.on_front = not any(
            other.accuracy >= trial.accuracy and other.tokens_per_second >= trial.tokens_per_second
            and (other.accuracy > trial.accuracy or other.tokens_per_second > trial.tokens_per_second)
            for other in results
        )


__all__ = ["SEARCH_SPACE", "Trial", "tune", "measure_setting", "best_setting", "front_table", "plot_front",
           "exact_match"]
