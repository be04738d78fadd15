"""TRL's fused LM head on a masked diffusion model: applied for the length of one loss computation (SFT), undone
where TRL adds it for good (the SFT, DPO and GRPO trainers' models)."""

import contextlib

import torch
from accelerate.utils import is_peft_model
from trl.trainer.utils import add_fused_lm_head

from transformers import PreTrainedModel


def remove_fused_lm_head(model: torch.nn.Module | None) -> None:
    """Undo TRL's `add_fused_lm_head` (an instance-level `forward` wrapping the class's, which scores each position
    against the *next* token) on `model` or on the base model under its PEFT wrapper: the model's own forward is
    used again. Left in place, the wrapper also survives `copy.deepcopy(model)` still calling the *original* model's
    forward, so a copy trained further would answer with the original's logits."""
    if model is None:
        return
    base = model.get_base_model() if is_peft_model(model) else model
    forward = base.__dict__.get("forward")
    if forward is not None and getattr(getattr(forward, "__func__", None), "__wrapped__", None) is type(base).forward:
        del base.forward


@contextlib.contextmanager
def fused_lm_head(model: torch.nn.Module):
    """TRL's fused LM head (log-probabilities of given labels, without the [batch, length, vocab] logits) on `model`
    for the forward passes inside the block, then the model's own forward again: the patch never outlives a loss
    computation, so the trained model (and any copy of it) is a plain model.

    The labels are passed as `shift_labels`, which TRL scores as given (no next-token shift)."""
    base = model.get_base_model() if is_peft_model(model) else model
    if not isinstance(base, PreTrainedModel):  # a stand-in that answers `fused_lm_head=True` itself
        yield
        return
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    try:
        yield
    finally:
        remove_fused_lm_head(base)
