"""Draw the README's picture: a real GroupLayout's packed token axis and the attention mask
that its segments' key runs define.

    python scripts/draw_layout.py                          # rewrites docs/images/packed_layout.png
    python scripts/draw_layout.py --out /tmp/layout.png

The mask is read from the layout itself (``layout.segmentation.key_runs``), the same
segmentation every attention backend reads; tests/test_docs_figures.py checks it against
what ``prefix_attention(..., backend="reference")`` lets each query see. Needs matplotlib
(the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import os

import torch

from prefix_grouper import GroupLayout

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "docs", "images", "packed_layout.png")
# Two groups: a 4-token prompt with G = 3 completions (3, 2, 2 tokens), a 3-token prompt with G = 2 (3, 2).
PROMPT_LENS = [4, 3]
COMPLETION_LENS = [[3, 2, 2], [3, 2]]
# One hue family per group: the prompt darkest, its completions lighter.
GROUP_COLORS = [["#1f4e99", "#5b8fd6", "#8fb4e6", "#c0d6f2"], ["#b3541e", "#e08a4f", "#f0b58a", "#f7d5bb"]]


def example_layout() -> GroupLayout:
    return GroupLayout.from_lengths(PROMPT_LENS, COMPLETION_LENS)


def attention_mask(layout: GroupLayout) -> torch.Tensor:
    """``[T, T]`` bool: ``mask[q, k]`` is True where query token ``q`` sees key token ``k``.

    A segment's queries see its ancestors' key runs whole and its own run causally."""
    segmentation = layout.segmentation
    mask = torch.zeros(layout.total_tokens, layout.total_tokens, dtype=torch.bool)
    for index, segment in enumerate(segmentation.segments):
        *ancestors, _own = segmentation.key_runs(index)
        rows = slice(segment.start, segment.start + segment.length)
        for start, length in ancestors:
            mask[rows, start:start + length] = True
        mask[rows, rows] = torch.ones(segment.length, segment.length, dtype=torch.bool).tril()
    return mask


def segment_names(layout: GroupLayout) -> list[str]:
    """``prompt 1``, ``completion 1.1``, ... one per segment, in packed order."""
    names = []
    for group_number, group in enumerate(layout.segmentation.groups, start=1):
        names.append(f"prompt {group_number}")
        names += [f"completion {group_number}.{i}" for i in range(1, len(group))]
    return names


def segment_colors(layout: GroupLayout) -> list[str]:
    colors = []
    for group_number, group in enumerate(layout.segmentation.groups):
        palette = GROUP_COLORS[group_number % len(GROUP_COLORS)]
        colors += [palette[min(i, len(palette) - 1)] for i in range(len(group))]
    return colors


def draw(layout: GroupLayout, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    total = layout.total_tokens
    segment_of = layout.token_segment.tolist()
    colors, names = segment_colors(layout), segment_names(layout)
    token_rgb = torch.tensor([to_rgb(colors[s]) for s in segment_of])  # [T, 3]
    mask = attention_mask(layout)
    # A visible (query, key) cell takes its key's segment color; a hidden one stays white.
    image = torch.where(mask[:, :, None], token_rgb[None, :, :], torch.ones(3))

    figure, (axis_tokens, axis_mask) = plt.subplots(
        2, 1, figsize=(7.2, 8.6), gridspec_kw={"height_ratios": [1.3, total]}, constrained_layout=True)
    axis_tokens.imshow(token_rgb[None].numpy(), aspect="auto", extent=(-0.5, total - 0.5, 0.5, -0.5))
    for token, position in enumerate(layout.position_ids.tolist()):
        light = float(token_rgb[token].mean()) > 0.6  # dark digits on the lighter completion colors
        axis_tokens.text(token, 0, str(position), ha="center", va="center", fontsize=8,
                         color="black" if light else "white")
    axis_tokens.set_yticks([])
    axis_tokens.set_xticks(range(total))
    axis_tokens.tick_params(labelsize=7)
    axis_tokens.set_title(f"packed token axis ({total} tokens; the numbers are position_ids) "
                          f"vs {layout.unpacked_tokens()} unpacked", fontsize=9)

    axis_mask.imshow(image.numpy(), interpolation="nearest")
    for boundary in [s.start - 0.5 for s in layout.segments[1:]]:
        axis_mask.axhline(boundary, color="0.75", linewidth=0.6)
        axis_mask.axvline(boundary, color="0.75", linewidth=0.6)
    axis_mask.set_xticks(range(total))
    axis_mask.set_yticks(range(total))
    axis_mask.tick_params(labelsize=7)
    axis_mask.set_xlabel("key token (packed index)")
    axis_mask.set_ylabel("query token (packed index)")
    axis_mask.set_title("attention mask: each completion sees its prompt and itself (causal), never a sibling",
                        fontsize=9)
    axis_mask.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, names)], fontsize=7,
                     loc="upper right", framealpha=0.95)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw a GroupLayout's packed axis and attention mask as a PNG.")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the PNG to write (default: docs/images/packed_layout.png)")
    args = parser.parse_args(argv)
    draw(example_layout(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
