"""Batches for masked-diffusion training: right padding, EOS-padded answers, labels that mark the maskable tokens."""

from dataclasses import dataclass
from typing import Any

import torch

from transformers.data.data_collator import DataCollatorMixin


@dataclass
class DataCollatorForMaskedDiffusion(DataCollatorMixin):
    """Pad tokenized examples into a batch for [`DiffusionSFTTrainer`].

    Each example holds `input_ids` and optionally `labels` (`-100` on the prompt; without `labels` every token is
    maskable, as for pretraining). The batch holds `input_ids`, `attention_mask` and `labels`: the token id at each
    maskable (answer) position, `-100` elsewhere. Labels are *not* shifted: a masked diffusion model predicts the
    token at its own position. The noise itself is drawn by the trainer, not here.

    Padding is on the right. A row with a prompt (some label is `-100`) is padded, when `pad_answers_with_eos`, with
    EOS tokens that belong to its answer: attended and maskable (LLaDA SFT rule, which teaches the model to stop).
    Other rows (pretraining text, or all rows when `pad_answers_with_eos=False`) get `pad_token_id` padding that is
    neither attended nor scored.

    Args:
        pad_token_id: id used for ordinary padding.
        eos_token_id: id used to pad answers.
        pad_answers_with_eos: whether answers of rows with a prompt are padded with scored EOS tokens.
        pad_to_multiple_of: if set, the batch length is rounded up to a multiple of it.

    Example:
        ```python
        >>> from llada_hf.trainers import DataCollatorForMaskedDiffusion
        >>> collator = DataCollatorForMaskedDiffusion(pad_token_id=0, eos_token_id=1)
        >>> batch = collator([
        ...     {"input_ids": [7, 8, 9, 1], "labels": [-100, -100, 9, 1]},  # prompt 7 8, answer 9 + EOS
        ...     {"input_ids": [7, 9, 1], "labels": [-100, 9, 1]},
        ... ])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[7, 8, 9, 1], [7, 9, 1, 1]], [[-100, -100, 9, 1], [-100, 9, 1, 1]])
        >>> batch["attention_mask"].tolist()
        [[1, 1, 1, 1], [1, 1, 1, 1]]
        ```
    """

    pad_token_id: int
    eos_token_id: int
    pad_answers_with_eos: bool = True
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for row, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            row_labels = torch.as_tensor(example.get("labels", example["input_ids"]), dtype=torch.long)
            n = len(ids)
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = ids, row_labels, 1
            has_prompt = bool((row_labels == -100).any())
            if self.pad_answers_with_eos and has_prompt:
                input_ids[row, n:] = labels[row, n:] = self.eos_token_id
                attention_mask[row, n:] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
