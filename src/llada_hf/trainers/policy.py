"""Learning a decoding policy from the model's own traces (Learn2PD-style): `PolicyTrainingConfig`,
`learn_decoding_policy`.

1. *Traces*: the model decodes the user's prompts with the slow exact decoder (one token per step, in the strategy's
   order, no parallel decoding); at every step each masked position of the window is recorded with the features the
   policy reads (`llada_hf.policy_llada.StepSignals`, the same code that serves `generate`) and its current argmax.
2. *Labels*: a position was already final at a step when its argmax then equals the token finally committed there;
   a row's block was done when every masked position of it was final.
3. *Fit*: logistic regression (or a one-hidden-layer network) by full-batch Adam on the logistic loss, in float64,
   seeded; the features' standardisation is folded into the weights, so the policy is a handful of plain numbers.
4. *Threshold*: on prompts held out from the fit, the lowest probability at which the positions the policy would
   commit are still at least `target_precision` final (likewise for the block-done head).

The policy goes into the model's generation config and is saved with it:

```python
from llada_hf.trainers.policy import PolicyTrainingConfig, learn_decoding_policy

policy = learn_decoding_policy(model, tokenizer, prompts, PolicyTrainingConfig(max_new_tokens=64, block_length=32))
model.generation_config.decoding_policy = policy      # generate() uses it from now on
model.generation_config.save_pretrained("my-model")   # and loads it back with the model
```
"""

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..decoding_llada import left_pad
from ..policy_llada import (
    BLOCK_FEATURES,
    POLICY_VERSION,
    POSITION_FEATURES,
    DecodingPolicy,
    PolicyHead,
    StepSignals,
)


@dataclass
class PolicyTrainingConfig:
    r"""
    Configuration of [`learn_decoding_policy`].

    Parameters:
        > Parameters that control the traces

        max_new_tokens (`int`, defaults to `64`):
            Answer length the exact decoder fills for each prompt.
        block_length (`int` or `None`, defaults to `32`):
            Block length of the traces (`None`: the model's generation config, else the whole answer). The policy's
            features are relative to the block, so one policy serves other answer lengths.
        remasking (`str`, defaults to `"low_confidence"`):
            The exact decoder's order (a registered strategy name).
        batch_size (`int`, defaults to `8`):
            Prompts decoded together.

        > Parameters that control the policy

        features (`tuple[str, ...]`):
            Position features of the commit head (names of `POSITION_FEATURES`).
        hidden_size (`int`, defaults to `0`):
            Hidden ReLU units of the commit head; 0: logistic regression over the features.
        block_done (`bool`, defaults to `True`):
            Also learn the block-done head (over `block_features`); it is left out when no threshold reaches the
            target precision.
        block_features (`tuple[str, ...]`):
            Row summaries of the block-done head (names of `BLOCK_FEATURES`).

        > Parameters that control the fit

        iterations (`int`, defaults to `300`):
            Full-batch Adam steps.
        learning_rate (`float`, defaults to `0.05`).
        weight_decay (`float`, defaults to `1e-4`):
            L2 penalty on the weights (not the biases).
        held_out_fraction (`float`, defaults to `0.25`):
            Share of the prompts whose traces choose the thresholds instead of fitting the weights.
        target_precision (`float`, defaults to `0.99`):
            The share of the positions the policy commits early that must be final (on the held-out prompts).
        min_threshold (`float`, defaults to `0.5`):
            The thresholds are never lower (a policy that fires on a coin flip is no policy).
        seed (`int`, defaults to `0`):
            Seeds the held-out split and the initial weights; with the same model and prompts the policy is the same.
    """

    max_new_tokens: int = 64
    block_length: int | None = 32
    remasking: str = "low_confidence"
    batch_size: int = 8
    features: tuple[str, ...] = tuple(POSITION_FEATURES)
    hidden_size: int = 0
    block_done: bool = True
    block_features: tuple[str, ...] = tuple(BLOCK_FEATURES)
    iterations: int = 300
    learning_rate: float = 0.05
    weight_decay: float = 1e-4
    held_out_fraction: float = 0.25
    target_precision: float = 0.99
    min_threshold: float = 0.5
    seed: int = 0

    def __post_init__(self):
        self.features, self.block_features = tuple(self.features), tuple(self.block_features)
        for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size),
                            ("iterations", self.iterations)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.block_length is not None and (not isinstance(self.block_length, int) or self.block_length <= 0):
            raise ValueError(f"`block_length` must be a positive integer or None, got {self.block_length!r}.")
        if not isinstance(self.hidden_size, int) or self.hidden_size < 0:
            raise ValueError(f"`hidden_size` must be an integer >= 0, got {self.hidden_size!r}.")
        for name, names, known in (("features", self.features, POSITION_FEATURES),
                                   ("block_features", self.block_features, BLOCK_FEATURES)):
            strange = [feature for feature in names if feature not in known]
            if not names or strange or len(set(names)) != len(names):
                raise ValueError(f"`{name}` must name distinct features of {list(known)}, got {list(names)}.")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"`held_out_fraction` must lie in (0, 1), got {self.held_out_fraction!r}.")
        for name in ("target_precision", "min_threshold"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`{name}` must lie in (0, 1), got {getattr(self, name)!r}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)) or not self.weight_decay >= 0:
            raise ValueError("`learning_rate` must be > 0 and `weight_decay` >= 0.")


@dataclass
class PolicyTraces:
    """What the exact decoder did, as training data: every masked position at every step (`position_*`, [N, ...])
    and every row at every step (`block_*`, [M, ...]), with its label and the prompt it came from."""

    position_features: torch.Tensor  # [N, F] float64
    position_labels: torch.Tensor  # [N] bool: its argmax then was the token finally committed
    position_prompts: torch.LongTensor  # [N]
    block_features: torch.Tensor  # [M, Fb] float64
    block_labels: torch.Tensor  # [M] bool: every masked position of the block was final
    block_prompts: torch.LongTensor  # [M]


class _TraceRecorder(DecodingPolicy):
    """A policy that commits nothing early (the decoder stays exact) and records what each step knew."""

    def __init__(self, features: Sequence[str], block_features: Sequence[str]):
        self.features, self.block_features = tuple(features), tuple(block_features)
        self.steps: list[dict] = []

    def decide(self, signals: StepSignals) -> tuple[torch.Tensor, torch.Tensor]:
        row_index, window_index = signals.eligible.nonzero(as_tuple=True)
        self.steps.append({
            "features": signals.position_features(self.features)[row_index, window_index].double().cpu(),
            "rows": signals.rows[row_index].cpu(),
            "row_index": row_index.cpu(),
            "columns": signals.columns[row_index, window_index].cpu(),
            "argmax": signals.logits[row_index, window_index].argmax(-1).cpu(),
            "block_rows": signals.rows.cpu(),
            "block_features": signals.block_features(self.block_features).double().cpu(),
        })
        return torch.zeros_like(signals.eligible), torch.zeros_like(signals.block_start, dtype=torch.bool)


@torch.no_grad()
def collect_policy_traces(model, tokenizer, prompts: Sequence[str], config: PolicyTrainingConfig) -> PolicyTraces:
    """Decode `prompts` with the exact decoder and record every step (steps 1-2 of the module's docstring).

    The exact decoder: the model's generation settings, with one token per step in `config.remasking` order, greedy,
    and no parallel decoding, cache, bounded canvas or early exit.

    Example:
        ```python
        >>> from llada_hf.trainers.policy import PolicyTrainingConfig, collect_policy_traces, fit_decoding_policy
        >>> # traces = collect_policy_traces(model, tokenizer, prompts, PolicyTrainingConfig(max_new_tokens=64))
        >>> # traces.position_labels.float().mean()  ->  the share of (step, position) samples already final
        >>> # policy = fit_decoding_policy(traces, PolicyTrainingConfig(max_new_tokens=64))
        ```
    """
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    settings = dict(max_new_tokens=config.max_new_tokens, steps=config.max_new_tokens, remasking=config.remasking,
                    temperature=0.0, do_sample=False, confidence_threshold=None, parallel_factor=None,
                    entropy_bound=None, kv_cache=None, canvas_tail=None, early_exit=False, num_return_sequences=1,
                    return_dict_in_generate=True, output_history=False)
    if config.block_length is not None:
        settings["block_length"] = config.block_length
    parts: dict[str, list] = {key: [] for key in ("features", "labels", "prompts", "block_features", "block_labels",
                                                  "block_prompts")}
    for first in range(0, len(prompts), config.batch_size):
        chunk = prompts[first : first + config.batch_size]
        rows = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in chunk]
        input_ids, attention_mask = left_pad(rows, pad_id)
        recorder = _TraceRecorder(config.features, config.block_features)
        out = model.generate(input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             decoding_policy=recorder, **settings)
        final = out.sequences.cpu()
        for step in recorder.steps:
            labels = final[step["rows"], step["columns"]] == step["argmax"]
            wrong = torch.zeros(len(step["block_rows"]), dtype=torch.long).index_add_(0, step["row_index"],
                                                                                    (~labels).long())
            has_masks = torch.zeros_like(wrong).index_add_(0, step["row_index"], torch.ones_like(step["row_index"]))
            keep = has_masks > 0
            parts["features"].append(step["features"])
            parts["labels"].append(labels)
            parts["prompts"].append(step["rows"] + first)
            parts["block_features"].append(step["block_features"][keep])
            parts["block_labels"].append((wrong == 0)[keep])
            parts["block_prompts"].append(step["block_rows"][keep] + first)
    if not parts["features"]:
        raise ValueError("The exact decoder committed nothing: pass at least one prompt.")
    cat = {key: torch.cat(values) for key, values in parts.items()}
    return PolicyTraces(cat["features"], cat["labels"], cat["prompts"], cat["block_features"], cat["block_labels"],
                        cat["block_prompts"])


def fit_decoding_policy(traces: PolicyTraces, config: PolicyTrainingConfig) -> dict:
    """Fit the heads on the traces of most prompts and choose their thresholds on the others (steps 3-4); returns the
    policy's numbers, with `info` (see `learn_decoding_policy`; example: `collect_policy_traces`)."""
    prompts = torch.unique(traces.position_prompts)
    generator = torch.Generator().manual_seed(config.seed)
    shuffled = prompts[torch.randperm(len(prompts), generator=generator)]
    held_count = max(1, round(len(prompts) * config.held_out_fraction)) if len(prompts) > 1 else 0
    if held_count == 0:
        warnings.warn("One prompt: the thresholds are chosen on the traces the weights were fitted on (optimistic); "
                      "pass more prompts.", UserWarning, stacklevel=3)
    held_out = shuffled[:held_count] if held_count else shuffled

    def split(prompt_of):
        held = torch.isin(prompt_of, held_out)
        return (~held if held_count else torch.ones_like(held)), held

    fit_rows, check_rows = split(traces.position_prompts)
    head, report = _fit_head(traces.position_features[fit_rows], traces.position_labels[fit_rows],
                             traces.position_features[check_rows], traces.position_labels[check_rows],
                             config.features, config.hidden_size, config, generator)
    info = {"max_new_tokens": config.max_new_tokens, "block_length": config.block_length,
            "remasking": config.remasking, "prompts": len(prompts), "held_out_prompts": held_count,
            "positions": len(traces.position_labels), "final_share": _share(traces.position_labels),
            "target_precision": config.target_precision, **{f"commit_{k}": v for k, v in report.items()}}
    policy = {"version": POLICY_VERSION, **head}
    if config.block_done:
        fit_rows, check_rows = split(traces.block_prompts)
        labels = traces.block_labels
        if bool(fit_rows.any()):
            block_head, block_report = _fit_head(traces.block_features[fit_rows], labels[fit_rows],
                                                 traces.block_features[check_rows], labels[check_rows],
                                                 config.block_features, 0, config, generator)
            info.update({f"block_done_{k}": v for k, v in block_report.items()})
            if block_head["threshold"] < 1:
                policy["block_done"] = block_head
    policy["info"] = info
    return policy


def learn_decoding_policy(model, tokenizer, prompts: Sequence[str], config: PolicyTrainingConfig | None = None
                          ) -> dict:
    """Learn a decoding policy for `model` from its own exact decoding of `prompts` (Learn2PD-style; see the module).

    Returns the policy's numbers (a JSON-able dict): pass it as `generate(..., decoding_policy=policy)`, or set
    `model.generation_config.decoding_policy = policy` and save the generation config, and `generate` uses it with no
    extra code (also from a `trust_remote_code` checkpoint). Deterministic: the same model, prompts and config give
    the same policy. `policy["info"]` says what it was trained on and how precise it was on the held-out prompts.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf import LladaConfig, LladaForMaskedDiffusion
        >>> from llada_hf.trainers.policy import PolicyTrainingConfig, learn_decoding_policy
        >>> class Ids:  # a stand-in tokenizer: prompts are space-separated ids
        ...     def __call__(self, text, add_special_tokens=False):
        ...         return type("Encoding", (), {"input_ids": [int(t) for t in text.split()]})
        >>> config = LladaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, mask_token_id=63, pad_token_id=0, eos_token_id=1)
        >>> model = LladaForMaskedDiffusion(config).eval()
        >>> prompts = [f"{a} {a + 1} {a + 2}" for a in range(2, 10)]
        >>> config = PolicyTrainingConfig(max_new_tokens=8, block_length=4)
        >>> policy = learn_decoding_policy(model, Ids(), prompts, config)
        >>> policy["features"][:3], 0 < policy["threshold"] <= 1
        (['confidence', 'margin', 'entropy'], True)
        >>> out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, block_length=4, decoding_policy=policy)
        ```
    """
    config = config if config is not None else PolicyTrainingConfig()
    if isinstance(prompts, str) or not prompts:
        raise ValueError("`prompts` must be a non-empty list of prompt strings.")
    traces = collect_policy_traces(model, tokenizer, list(prompts), config)
    policy = fit_decoding_policy(traces, config)
    policy["info"]["config"] = {key: list(value) if isinstance(value, tuple) else value
                                for key, value in asdict(config).items()}
    return policy


# ---- fitting one head ----------------------------------------------------------------------------------------------


def _fit_head(x: torch.Tensor, y: torch.Tensor, x_check: torch.Tensor, y_check: torch.Tensor, names: Sequence[str],
              hidden_size: int, config: PolicyTrainingConfig, generator: torch.Generator) -> tuple[dict, dict]:
    """Fit sigmoid(w . relu(W x + c) + b) (or sigmoid(w . x + b)) to (x, y) by the logistic loss; choose the threshold
    on (x_check, y_check). Returns the head's numbers (standardisation folded in) and a report."""
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-2)  # a near-constant feature: no huge weights
    z = (x - mean) / std
    features = x.shape[1]
    prior = float(y.mean().clamp(1e-4, 1 - 1e-4))
    parameters = {"bias": torch.tensor(math.log(prior / (1 - prior)), dtype=torch.float64)}
    if hidden_size:
        parameters["hidden"] = torch.randn(hidden_size, features, generator=generator, dtype=torch.float64)
        parameters["hidden"] /= math.sqrt(features)
        parameters["hidden_bias"] = torch.zeros(hidden_size, dtype=torch.float64)
        parameters["weights"] = torch.randn(hidden_size, generator=generator, dtype=torch.float64) * 0.1
    else:
        parameters["weights"] = torch.zeros(features, dtype=torch.float64)
    for tensor in parameters.values():
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters.values(), lr=config.learning_rate)

    def logits_of(inputs, p):
        hidden = torch.relu(inputs @ p["hidden"].T + p["hidden_bias"]) if hidden_size else inputs
        return hidden @ p["weights"] + p["bias"]

    with torch.enable_grad():
        for _ in range(config.iterations):
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(logits_of(z, parameters), y)
            penalty = sum((parameters[k] ** 2).sum() for k in ("weights", "hidden") if k in parameters)
            (loss + config.weight_decay * penalty).backward()
            optimizer.step()
    p = {key: value.detach() for key, value in parameters.items()}
    head: dict = {"features": list(names)}
    if hidden_size:  # relu(W (x - m) / s + c) = relu((W / s) x + c - W (m / s))
        head["hidden"] = (p["hidden"] / std).tolist()
        head["hidden_bias"] = (p["hidden_bias"] - p["hidden"] @ (mean / std)).tolist()
        head["weights"], head["bias"] = p["weights"].tolist(), float(p["bias"])
    else:  # w . (x - m) / s + b = (w / s) . x + b - w . (m / s)
        head["weights"] = (p["weights"] / std).tolist()
        head["bias"] = float(p["bias"] - p["weights"] @ (mean / std))
    probabilities = torch.sigmoid(PolicyHead(head).logits(x_check.double()))  # the saved numbers, as decoded
    threshold = _threshold(probabilities, y_check.bool(), config.target_precision, config.min_threshold)
    fired = probabilities >= threshold
    report = {"threshold": threshold, "held_out_samples": int(len(y_check)),
              "held_out_precision": _share(y_check.bool()[fired]) if bool(fired.any()) else None,
              "held_out_recall": (int((fired & y_check.bool()).sum()) / max(1, int(y_check.bool().sum()))),
              "fit_loss": float(F.binary_cross_entropy_with_logits(logits_of(z, p), y))}
    head["threshold"] = threshold
    return head, report


def _threshold(probabilities: torch.Tensor, labels: torch.Tensor, target: float, floor: float) -> float:
    """The threshold that fires on the most samples while those it fires on are at least `target` right: it lies
    halfway (in logits) between the lowest probability it keeps and the next one, never below `floor` (at `floor`
    when it keeps every sample above it); 1.0 (never firing) when no cut reaches the target."""
    order = probabilities.argsort(descending=True, stable=True)
    ranked, right = probabilities[order], labels[order].double()
    precision = right.cumsum(0) / torch.arange(1, len(right) + 1, dtype=torch.float64)
    cut = torch.ones_like(ranked, dtype=torch.bool)  # a cut falls between distinct values only
    cut[:-1] = ranked[:-1] > ranked[1:]
    good = ((precision >= target) & cut & (ranked >= floor)).nonzero()
    if good.numel() == 0:
        return 1.0
    last = int(good[-1])
    if last + 1 == len(ranked) or float(ranked[last + 1]) < floor:
        return floor
    halfway = (torch.logit(ranked[last]) + torch.logit(ranked[last + 1])) / 2
    return float(torch.sigmoid(halfway).clamp(min=floor, max=1.0))


def _share(labels: torch.Tensor) -> float:
    return float(labels.double().mean()) if labels.numel() else 0.0


__all__ = ["PolicyTrainingConfig", "PolicyTraces", "collect_policy_traces", "fit_decoding_policy",
           "learn_decoding_policy"]
