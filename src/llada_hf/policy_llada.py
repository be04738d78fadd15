"""A learned unmasking policy: at each denoising step, which masked positions are already final, and when a block is
done (Learn2PD-style; issue 29).

Part of the model bundle: imports only torch, because it is copied next to every saved checkpoint and must run where
`llada_hf` is not installed. The policy is a handful of numbers saved in `generation_config.json`
(`decoding_policy={...}`), so `generate` loads it with the rest of the settings.

How a step uses it (`DiffusionDecodingState.finish_step`, step 7): the step commits its scheduled tokens in the
strategy's order as always, and *also* every eligible masked position whose commit probability reaches the policy's
`threshold`; when the optional block-done head fires for a row, that row commits every remaining mask of its block.
The schedule stays the floor, so a policy can only make a block end sooner: one that never fires gives exactly the
tokens of the sampler without it, and no policy can keep a block from ending within its steps.

What the policy reads (`StepSignals`, computed only for the window of the step, only the features it names):

| position feature | meaning |
|---|---|
| `confidence` | softmax probability of the position's candidate |
| `margin` | top-1 minus top-2 probability |
| `entropy` | entropy of the predicted distribution (nats) |
| `block_position` | place in the block: 0 for its first position, (n - 1) / n for its last |
| `block_progress` | steps the block has taken / the steps it has |
| `masked_fraction` | masks left in the block (eligible positions) / the block's length |
| `stable_steps` | consecutive earlier steps with the same argmax at the position (0 when it changed), at most 16 |

The block-done head reads row summaries of the eligible positions: `min_confidence`, `mean_confidence`,
`min_margin`, `max_entropy`, `min_stable_steps`, `block_progress`, `masked_fraction`.

The numbers (`LearnedDecodingPolicy`): a logistic regression, or a one-hidden-layer ReLU network, over the named
features (the training side, `llada_hf.trainers.policy`, folds its feature standardisation into the weights):

```
{"version": 1,
 "features": ["confidence", "margin", ...],      # F names from POSITION_FEATURES
 "hidden": [[F numbers], ...], "hidden_bias": [H numbers],   # optional: H hidden ReLU units
 "weights": [F or H numbers], "bias": b,          # commit probability = sigmoid(weights . h + b)
 "threshold": 0.9,                                # commit where the probability >= threshold (1: never)
 "block_done": {"features": [...BLOCK_FEATURES], "weights": [...], "bias": b, "threshold": t},   # optional
 "info": {...}}                                   # optional: how it was trained (not read)
```
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


STABLE_STEPS_CAP = 16

POSITION_FEATURES: dict[str, str] = {
    "confidence": "softmax probability of the position's candidate",
    "margin": "top-1 minus top-2 probability",
    "entropy": "entropy of the predicted distribution (nats)",
    "block_position": "place in the block: 0 for its first position, (n - 1) / n for its last",
    "block_progress": "steps the block has taken / the steps it has",
    "masked_fraction": "masks left in the block (eligible positions) / the block's length",
    "stable_steps": f"consecutive earlier steps with the same argmax at the position, at most {STABLE_STEPS_CAP}",
}
BLOCK_FEATURES: dict[str, str] = {
    "min_confidence": "the lowest `confidence` of the row's eligible positions",
    "mean_confidence": "their mean `confidence`",
    "min_margin": "their lowest `margin`",
    "max_entropy": "their highest `entropy`",
    "min_stable_steps": "their lowest `stable_steps`",
    "block_progress": "steps the block has taken / the steps it has",
    "masked_fraction": "masks left in the block / the block's length",
}
POLICY_VERSION = 1


# --------------------------------------------------------------------------------------------------
# What a step knows: the signals a policy reads
# --------------------------------------------------------------------------------------------------


@dataclass
class StepSignals:
    """What one denoising step knows about the masked positions of its rows' windows; features are computed on first
    use and kept (a policy pays only for the features it names).

    Args:
        rows: [R] the indices, in the batch, of the rows that take the step.
        logits: [R, W, V] the window's (processed) logits of those rows.
        candidates: [R, W] the token each position would get.
        eligible: [R, W] masked positions that may be committed this step.
        columns: [R, W] each window position's place in the sequence.
        block_start, block_end: [R] each row's current block.
        block_step, block_steps: [R] the steps the row's block has taken (before this one) and has in all.
        stable_steps: [R, W] consecutive earlier steps with the same argmax at each position.
    """

    rows: torch.LongTensor
    logits: torch.Tensor
    candidates: torch.LongTensor
    eligible: torch.Tensor
    columns: torch.LongTensor
    block_start: torch.LongTensor
    block_end: torch.LongTensor
    block_step: torch.LongTensor
    block_steps: torch.LongTensor
    stable_steps: torch.LongTensor
    _cache: dict = field(default_factory=dict, repr=False)

    def position_feature(self, name: str) -> torch.Tensor:
        """[R, W] float32: the named feature of `POSITION_FEATURES` at every window position."""
        if name not in self._cache:
            self._cache[name] = _POSITION_FEATURE_FUNCTIONS[name](self)
        return self._cache[name]

    def position_features(self, names) -> torch.Tensor:
        """[R, W, F] float32: the named features, in order."""
        return torch.stack([self.position_feature(name) for name in names], dim=-1)

    def block_feature(self, name: str) -> torch.Tensor:
        """[R] float32: the named row summary of `BLOCK_FEATURES` (0 for a row with no eligible position)."""
        key = "block:" + name
        if key not in self._cache:
            self._cache[key] = _BLOCK_FEATURE_FUNCTIONS[name](self)
        return self._cache[key]

    def block_features(self, names) -> torch.Tensor:
        """[R, F] float32: the named row summaries, in order."""
        return torch.stack([self.block_feature(name) for name in names], dim=-1)

    @property
    def float_logits(self) -> torch.Tensor:
        """[R, W, V] the logits in float32, forbidden tokens (-inf) at float32's lowest value (so 0 * logit is 0)."""
        if "float_logits" not in self._cache:
            self._cache["float_logits"] = self.logits.float().clamp(min=torch.finfo(torch.float32).min)
        return self._cache["float_logits"]

    @property
    def probs(self) -> torch.Tensor:
        """[R, W, V] float32 softmax of the logits (computed once, for every feature that needs it)."""
        if "probs" not in self._cache:
            self._cache["probs"] = F.softmax(self.float_logits, dim=-1)
        return self._cache["probs"]

    @property
    def top2(self) -> tuple[torch.Tensor, torch.LongTensor]:
        """([R, W, 2] the two highest probabilities, [R, W, 2] their tokens)."""
        if "top2" not in self._cache:
            self._cache["top2"] = self.probs.topk(2, dim=-1)
        return self._cache["top2"]

    @property
    def block_size(self) -> torch.Tensor:
        return (self.block_end - self.block_start).clamp(min=1).float()


def _margin(signals: StepSignals) -> torch.Tensor:
    top2 = signals.top2[0]
    return top2[..., 0] - top2[..., 1]


def _entropy(signals: StepSignals) -> torch.Tensor:
    """H = -sum p log p = log Z - sum p l, with log Z = l_max - log p_max (cheaper than a second pass over V)."""
    logits, (top, index) = signals.float_logits, signals.top2
    log_normaliser = logits.gather(-1, index[..., :1]).squeeze(-1) - top[..., 0].log()
    return (log_normaliser - (signals.probs * logits).sum(-1)).clamp(min=0)


def _per_row(signals: StepSignals, values: torch.Tensor) -> torch.Tensor:
    return values[:, None].expand(signals.candidates.shape).float()


_POSITION_FEATURE_FUNCTIONS = {
    "confidence": lambda s: s.probs.gather(-1, s.candidates[..., None]).squeeze(-1),
    "margin": _margin,
    "entropy": _entropy,
    "block_position": lambda s: ((s.columns - s.block_start[:, None]).float() / s.block_size[:, None]).clamp(0, 1),
    "block_progress": lambda s: _per_row(s, s.block_step.float() / s.block_steps.clamp(min=1).float()),
    "masked_fraction": lambda s: _per_row(s, s.eligible.sum(1).float() / s.block_size),
    "stable_steps": lambda s: s.stable_steps.clamp(max=STABLE_STEPS_CAP).float(),
}


def _eligible_min(signals: StepSignals, name: str) -> torch.Tensor:
    values = signals.position_feature(name).masked_fill(~signals.eligible, float("inf")).min(1).values
    return torch.where(torch.isfinite(values), values, 0.0)


def _eligible_max(signals: StepSignals, name: str) -> torch.Tensor:
    values = signals.position_feature(name).masked_fill(~signals.eligible, float("-inf")).max(1).values
    return torch.where(torch.isfinite(values), values, 0.0)


def _eligible_mean(signals: StepSignals, name: str) -> torch.Tensor:
    total = (signals.position_feature(name) * signals.eligible).sum(1)
    return total / signals.eligible.sum(1).clamp(min=1)


_BLOCK_FEATURE_FUNCTIONS = {
    "min_confidence": lambda s: _eligible_min(s, "confidence"),
    "mean_confidence": lambda s: _eligible_mean(s, "confidence"),
    "min_margin": lambda s: _eligible_min(s, "margin"),
    "max_entropy": lambda s: _eligible_max(s, "entropy"),
    "min_stable_steps": lambda s: _eligible_min(s, "stable_steps"),
    "block_progress": lambda s: s.block_step.float() / s.block_steps.clamp(min=1).float(),
    "masked_fraction": lambda s: s.eligible.sum(1).float() / s.block_size,
}


# --------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------


class DecodingPolicy:
    """Decides, at each step, which masked positions to commit beyond the schedule, and which rows' blocks are done.

    Subclass it and implement `decide`, or build a `LearnedDecodingPolicy` from its numbers; pass it as
    `decoding_policy=`. Whatever it returns, a step commits at least its scheduled tokens and only eligible positions,
    so a policy can make a block end sooner but never later.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.policy_llada import DecodingPolicy
        >>> class SureTokens(DecodingPolicy):  # commit every candidate the model gives 0.99 or more
        ...     def decide(self, signals):
        ...         commit = signals.position_feature("confidence") >= 0.99
        ...         return commit, torch.zeros_like(signals.block_start, dtype=torch.bool)
        >>> SureTokens().to_dict()
        'SureTokens'
        ```
    """

    def decide(self, signals: StepSignals) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (commit [R, W] booleans: positions to commit beyond the schedule, done [R] booleans: rows whose whole
        block is committed this step)."""
        raise NotImplementedError

    def to_dict(self) -> "dict | str":
        """What `generation_config.json` keeps: the numbers of a learned policy; the class name of any other (which
        does not load back: pass the object again)."""
        return type(self).__name__


class PolicyHead:
    """One head of a policy from its numbers: sigmoid(weights . relu(hidden x + hidden_bias) + bias) >= threshold,
    compared as logits (threshold 1, or none yet, never fires); the numbers become tensors on first use on a device,
    in the features' dtype (the trainer evaluates the head it saves in float64, the decoder in float32)."""

    def __init__(self, spec: dict):
        self.features = tuple(spec["features"])
        self.spec = spec
        self.cut = _logit(float(spec.get("threshold", 1.0)))
        self._tensors: dict = {}

    def _on(self, device, dtype) -> tuple:
        if (device, dtype) not in self._tensors:
            spec = self.spec

            def tensor(values):
                return torch.tensor(values, dtype=dtype, device=device)

            hidden = (tensor(spec["hidden"]), tensor(spec["hidden_bias"])) if spec.get("hidden") else None
            self._tensors[device, dtype] = (hidden, tensor(spec["weights"]), float(spec.get("bias", 0.0)))
        return self._tensors[device, dtype]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[..., F] -> [...]: the head's logit."""
        hidden, weights, bias = self._on(features.device, features.dtype)
        if hidden is not None:
            features = torch.relu(features @ hidden[0].T + hidden[1])
        return features @ weights + bias

    def fires(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features) >= self.cut


def _logit(probability: float) -> float:
    return math.inf if probability >= 1 else math.log(probability / (1 - probability))


class LearnedDecodingPolicy(DecodingPolicy):
    """A policy given by its numbers (the dict that `generation_config.json` keeps; see the module's docstring):
    a commit head over position features and an optional block-done head over row summaries.

    Example:
        ```python
        >>> from llada_hf.policy_llada import LearnedDecodingPolicy
        >>> policy = LearnedDecodingPolicy({"features": ["confidence", "stable_steps"], "weights": [12.0, 1.0],
        ...                                 "bias": -10.0, "threshold": 0.9})
        >>> policy.to_dict()["threshold"]
        0.9
        >>> try:
        ...     LearnedDecodingPolicy({"features": ["confidence"], "weights": [1.0, 2.0], "threshold": 0.9})
        ... except ValueError as error:
        ...     print(error)
        `decoding_policy`: `weights` needs 1 numbers (one per feature), got 2.
        ```
    """

    def __init__(self, spec: dict):
        problem = policy_problem(spec)
        if problem is not None:
            raise ValueError(f"`decoding_policy`: {problem}.")
        self.spec = _plain(spec)
        self.commit_head = PolicyHead(self.spec)
        self.done_head = PolicyHead(self.spec["block_done"]) if self.spec.get("block_done") else None

    def commit_logits(self, signals: StepSignals) -> torch.Tensor:
        """[R, W]: the commit head's logit at every window position."""
        return self.commit_head.logits(signals.position_features(self.commit_head.features))

    def done_logits(self, signals: StepSignals) -> torch.Tensor | None:
        """[R]: the block-done head's logit per row (None without that head)."""
        if self.done_head is None:
            return None
        return self.done_head.logits(signals.block_features(self.done_head.features))

    def decide(self, signals: StepSignals) -> tuple[torch.Tensor, torch.Tensor]:
        commit = self.commit_logits(signals) >= self.commit_head.cut
        done = self.done_logits(signals)
        done = torch.zeros_like(signals.block_start, dtype=torch.bool) if done is None else done >= self.done_head.cut
        return commit, done

    def to_dict(self) -> dict:
        return _plain(self.spec)

    def __eq__(self, other) -> bool:
        return isinstance(other, LearnedDecodingPolicy) and self.spec == other.spec

    def __repr__(self) -> str:
        hidden = len(self.spec.get("hidden") or [])
        return (f"LearnedDecodingPolicy(features={list(self.commit_head.features)}, hidden={hidden}, "
                f"threshold={self.spec['threshold']}, block_done={self.done_head is not None})")


def resolve_policy(value: "dict | DecodingPolicy | None") -> DecodingPolicy | None:
    """The policy a `decoding_policy` setting names: None, a `DecodingPolicy`, or a learned policy's numbers.

    Example:
        ```python
        >>> from llada_hf.policy_llada import resolve_policy
        >>> resolve_policy({"features": ["confidence"], "weights": [8.0], "bias": -4.0, "threshold": 0.9})
        LearnedDecodingPolicy(features=['confidence'], hidden=0, threshold=0.9, block_done=False)
        ```
    """
    if value is None or isinstance(value, DecodingPolicy):
        return value
    return LearnedDecodingPolicy(value)


# --------------------------------------------------------------------------------------------------
# Checking a policy's numbers
# --------------------------------------------------------------------------------------------------


_HEAD_KEYS = {"features", "hidden", "hidden_bias", "weights", "bias", "threshold"}
_POLICY_KEYS = _HEAD_KEYS | {"version", "block_done", "info"}


def check_decoding_policy(value) -> str | None:
    """The `DIFFUSION_OPTIONS` check of `decoding_policy`: what is wrong with it, or None."""
    if value is None or isinstance(value, DecodingPolicy):
        return None
    if not isinstance(value, dict):
        return "must be a learned policy's dict of numbers (llada_hf.policy_llada) or a DecodingPolicy instance"
    problem = policy_problem(value)
    return None if problem is None else f"is malformed: {problem}"


def policy_problem(spec) -> str | None:
    """What is wrong with a learned policy's dict, in words that name the key to fix; None when it is usable.

    Example:
        ```python
        >>> from llada_hf.policy_llada import policy_problem
        >>> policy_problem({"features": ["confidence"], "weights": [8.0], "threshold": 0})
        '`threshold` must be a number in (0, 1] (1: never fires), got 0'
        ```
    """
    if not isinstance(spec, dict):
        return f"must be a dict, got {type(spec).__name__}"
    unknown = sorted(set(spec) - _POLICY_KEYS)
    if unknown:
        return f"unknown key(s) {unknown}; a policy has {sorted(_POLICY_KEYS)}"
    if spec.get("version", POLICY_VERSION) != POLICY_VERSION:
        return f"`version` {spec['version']!r} is not supported (this code reads version {POLICY_VERSION})"
    if "info" in spec and not isinstance(spec["info"], dict):
        return "`info` must be a dict"
    problem = _head_problem(spec, POSITION_FEATURES, "")
    if problem is None and spec.get("block_done") is not None:
        block = spec["block_done"]
        if not isinstance(block, dict):
            return "`block_done` must be a dict (a head over BLOCK_FEATURES) or absent"
        unknown = sorted(set(block) - _HEAD_KEYS)
        if unknown:
            return f"`block_done` has unknown key(s) {unknown}; a head has {sorted(_HEAD_KEYS)}"
        problem = _head_problem(block, BLOCK_FEATURES, "block_done.")
    return problem


def _head_problem(head: dict, known: dict, prefix: str) -> str | None:
    features = head.get("features")
    if not isinstance(features, (list, tuple)) or not features:
        return f"`{prefix}features` must be a non-empty list of names from {list(known)}"
    strange = [name for name in features if name not in known]
    if strange:
        return f"`{prefix}features` names {strange[0]!r}, not one of {list(known)}"
    if len(set(features)) != len(features):
        return f"`{prefix}features` names a feature twice"
    inputs = len(features)
    hidden = head.get("hidden")
    if hidden:
        if not isinstance(hidden, (list, tuple)) or not all(_numbers(row, inputs) for row in hidden):
            return f"`{prefix}hidden` must be a list of rows of {inputs} finite numbers (one per feature)"
        if not _numbers(head.get("hidden_bias"), len(hidden)):
            return f"`{prefix}hidden_bias` needs {len(hidden)} finite numbers (one per hidden unit)"
        inputs = len(hidden)
    elif head.get("hidden_bias"):
        return f"`{prefix}hidden_bias` is given without `{prefix}hidden`"
    weights = head.get("weights")
    if not _numbers(weights, inputs):
        what = "one per hidden unit" if hidden else "one per feature"
        count = len(weights) if isinstance(weights, (list, tuple)) else repr(weights)
        return f"`{prefix}weights` needs {inputs} numbers ({what}), got {count}"
    if "bias" in head and not _numbers([head["bias"]], 1):
        return f"`{prefix}bias` must be a finite number"
    threshold = head.get("threshold")
    if not _numbers([threshold], 1) or not 0 < threshold <= 1:
        return f"`{prefix}threshold` must be a number in (0, 1] (1: never fires), got {threshold!r}"
    return None


def _numbers(values, count: int) -> bool:
    """`count` finite numbers (bool is not a number)."""
    return (isinstance(values, (list, tuple)) and len(values) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))


def _plain(value):
    """A JSON-able copy: dicts, lists and floats (ints stay ints)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


__all__ = [
    "POSITION_FEATURES",
    "BLOCK_FEATURES",
    "StepSignals",
    "DecodingPolicy",
    "LearnedDecodingPolicy",
    "resolve_policy",
    "check_decoding_policy",
    "policy_problem",
]
