"""Pictures of diffusion decoding: which answer position was committed at which step.

Uses the `commit_step` of a `DiffusionGenerationOutput` (`generate(..., return_dict_in_generate=True)`).
"""

from collections.abc import Sequence

import torch

from .generation_llada import render_draft


def decoding_order_png(
    path: str,
    commit_step: torch.LongTensor,
    tokens: Sequence[str],
    title: str = "Decoding order",
) -> str:
    """Draw one answer's decoding order as a PNG: a column per position, a row per step, and the token
    committed there written at that cell. Positions filled by early exit (step -1) are left out.

    Args:
        path: where to write the PNG.
        commit_step: [answer] step index at which each position was committed.
        tokens: the decoded text of each answer position.
        title: the figure title.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.visualization import decoding_order_png
        >>> decoding_order_png("/tmp/order.png", torch.tensor([2, 0, 1]), ["a", "b", "c"])
        '/tmp/order.png'
        ```
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = commit_step.tolist()
    decided = [s for s in steps if s >= 0]
    num_steps = (max(decided) + 1) if decided else 1
    width = max(4.0, 0.55 * len(steps) + 1.5)
    height = max(2.5, 0.32 * num_steps + 1.5)
    fig, ax = plt.subplots(figsize=(width, height))
    cmap = plt.get_cmap("viridis")
    for position, (step, token) in enumerate(zip(steps, tokens)):
        if step < 0:
            continue
        colour = cmap(step / max(num_steps - 1, 1))
        ax.add_patch(plt.Rectangle((position - 0.45, step - 0.45), 0.9, 0.9, color=colour))
        ax.text(position, step, token.replace("\n", "⏎").strip() or "␣", ha="center", va="center", fontsize=8,
                color="white" if step < num_steps / 2 else "black")
    ax.set_xlim(-0.6, len(steps) - 0.4)
    ax.set_ylim(num_steps - 0.4, -0.6)  # step 0 at the top
    ax.set_xlabel("answer position")
    ax.set_ylabel("denoising step")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draft_lines(history: Sequence[torch.LongTensor], prompt_length: int, tokenizer, mask_token_id: int,
                row: int = 0, mask_symbol: str = "░") -> list[str]:
    """The answer after every step as text, masks drawn as `mask_symbol` (a terminal view of denoising).

    Example:
        ```python
        >>> # out = model.generate(ids, return_dict_in_generate=True, output_history=True)
        >>> # print("\\n".join(draft_lines(out.history, ids.shape[1], tokenizer, model.config.mask_token_id)))
        ```
    """
    return [
        render_draft(state[row, prompt_length:].tolist(), tokenizer, mask_token_id, mask_symbol).replace("\n", "⏎")
        for state in history
    ]
