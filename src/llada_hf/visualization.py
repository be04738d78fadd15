"""Pictures of diffusion decoding: which answer position was committed at which step.

Uses the `commit_step` of a `DiffusionGenerationOutput` (`generate(..., return_dict_in_generate=True)`).
"""

from collections.abc import Sequence

import torch

from .streaming_llada import render_draft


def decoding_order_png(
    path: str,
    commit_step: torch.LongTensor,
    tokens: Sequence[str],
    title: str = "Decoding order",
    correct: bool | None = None,
    expected: str | None = None,
) -> str:
    """Draw one answer's decoding order as a PNG: a column per position, a row per step, and the token
    committed there written at that cell. Positions filled by early exit (step -1) are left out.

    A legend tells which colour is which step (a colour bar beyond 8 steps) and, when `correct` is given, whether
    the answer is right; a wrong answer's cells are outlined in red. Columns are as wide as the longest token label.

    Args:
        path: where to write the PNG.
        commit_step: [answer] step index at which each position was committed.
        tokens: the decoded text of each answer position.
        title: the figure title.
        correct: whether the answer is right (None: not judged).
        expected: the right answer, named in the legend of a wrong one.

    Example:
        ```python
        >>> import torch
        >>> from llada_hf.visualization import decoding_order_png
        >>> decoding_order_png("/tmp/order.png", torch.tensor([2, 0, 1]), ["a", "b", "<|eot_id|>"], correct=False,
        ...                    expected="a c")
        '/tmp/order.png'
        ```
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps = commit_step.tolist()
    labels = [token.replace("\n", "⏎").strip() or "␣" for token in tokens]
    decided = [s for s in steps if s >= 0]
    num_steps = (max(decided) + 1) if decided else 1
    column = max(0.6, 0.085 * max((len(label) for label in labels), default=1) + 0.25)  # inches per position
    fig, ax = plt.subplots(figsize=(max(4.0, column * len(steps) + 1.5), max(2.5, 0.32 * num_steps + 1.5)))
    cmap = plt.get_cmap("viridis")
    colour = {s: cmap(s / max(num_steps - 1, 1)) for s in range(num_steps)}
    edge = {None: "none", True: "green", False: "red"}[correct]
    for position, (step, label) in enumerate(zip(steps, labels)):
        if step < 0:
            continue
        ax.add_patch(plt.Rectangle((position - 0.45, step - 0.45), 0.9, 0.9, facecolor=colour[step], edgecolor=edge,
                                   linewidth=2.5))
        ax.text(position, step, label, ha="center", va="center", fontsize=8,
                color="white" if step < num_steps / 2 else "black")
    ax.set_xlim(-0.6, len(steps) - 0.4)
    ax.set_ylim(num_steps - 0.4, -0.6)  # step 0 at the top
    ax.set_xticks(range(len(steps)))
    ax.set_yticks(range(num_steps))
    ax.set_xlabel("answer position")
    ax.set_ylabel("denoising step")
    ax.set_title(title)
    handles = []
    if num_steps <= 8:
        handles = [Patch(color=colour[s], label=f"committed at step {s}") for s in range(num_steps)]
    else:
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, num_steps - 1))
        fig.colorbar(mappable, ax=ax, label="step at which the token was committed")
    if correct is not None:
        handles.append(Patch(facecolor="none", edgecolor="green" if correct else "red", linewidth=2.5,
                             label="right answer" if correct else f"wrong answer (expected: {expected})"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
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
