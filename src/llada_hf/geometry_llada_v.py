"""LLaDA-V image geometry: into how many crops an image is cut, and how many features it becomes.

Part of the model bundle: imports only torch, transformers and sibling bundle modules, because it is
copied next to every saved checkpoint and must run where `llada_hf` is not installed.

Plain arithmetic, no tensors, shared by `LladaVProcessor` (which crops it sends, how many placeholders an image
needs) and `LladaVModel` (how the crops' features are packed), so the two can never disagree. An image takes one of
three layouts (official: `llava_arch.prepare_inputs_labels_for_multimodal`, `mm_utils.process_anyres_image`):

- `GRID`, the only image of its prompt under `anyres` / `anyres_max_N`: the tower sees the base crop (the image
  squashed to one crop) and the anyres grid's crops; the features are the base crop's, then the grid's unpadded to
  the image's aspect ratio (downscaled under `anyres_max_N`), with one `image_newline` after each row.
- `CROP_ROW`, each image of a prompt with several under `anyres` / `anyres_max_N`: one crop of the image padded to
  a square; its features, then one `image_newline`.
- `CROP`, every image under `"square"`: one crop, the base crop for the only image of a prompt, the image padded to
  a square among several (the official training code pads those whatever its `image_aspect_ratio`); its features,
  no newline. `"square"` is the official `image_aspect_ratio = "square"` with `mm_patch_merge_type = "flat"`, the
  defaults of the official training script, which its stage 1 (the projector's alignment) keeps.
"""

import math
import re
from dataclasses import dataclass

from transformers.image_processing_utils import select_best_resolution


SQUARE = "square"
GRID, CROP_ROW, CROP = "grid", "crop_row", "crop"


def max_num_patches(vision_aspect_ratio: str) -> int | None:
    """N of `"anyres_max_N"`; None for `"anyres"` (never downscaled) and `"square"` (no grid). Other values are a
    `ValueError`."""
    if vision_aspect_ratio in ("anyres", SQUARE):
        return None
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None:
        raise ValueError(
            f"`vision_aspect_ratio` must be 'anyres_max_N', 'anyres' or 'square', got {vision_aspect_ratio!r}."
        )
    return int(match.group(1))


def unpad_bounds(image_size: tuple[int, int], grid_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a padded (rows, cols) feature grid that shows an image of
    (height, width). As the official `unpad_image`: the kept extent is truncated with `int()` (transformers
    rounds it to 7 decimals first, which keeps one more row or column when the product is just below an integer).
    """
    height, width = image_size
    rows, cols = grid_size
    if width / height > cols / rows:  # padding was added above and below
        kept = int(height * (cols / width))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(width * (rows / height))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


@dataclass(frozen=True)
class ImageGeometry:
    """The crop and feature counts of LLaDA-V images, for one model's (or processor's) settings.

    Args:
        crop_size: side of a square crop in pixels (the tower's `image_size`).
        patches_per_side: features along a crop's side (`image_size // patch_size`); a crop gives its square.
        pinpoints: candidate `[height, width]` resolutions of the anyres grid, in the order they are tried.
        vision_aspect_ratio: `"anyres_max_N"`, `"anyres"` or `"square"` (see the module docstring).

    Example:
        ```python
        >>> from llada_hf.geometry_llada_v import ImageGeometry
        >>> official = [[384 * h, 384 * w] for w in range(1, 7) for h in range(1, 7)]
        >>> geometry = ImageGeometry(384, 27, official, "anyres_max_4")
        >>> geometry.grid((384, 768)), geometry.num_tokens((384, 768), "grid")  # 729 + 27 * (54 + 1)
        ((1, 2), 2214)
        >>> geometry.layouts([1, 2]), geometry.num_tokens((384, 768), "crop_row")
        (['grid', 'crop_row', 'crop_row'], 730)
        ```
    """

    crop_size: int
    patches_per_side: int
    pinpoints: list
    vision_aspect_ratio: str

    def __post_init__(self):
        max_num_patches(self.vision_aspect_ratio)  # validates the value

    @classmethod
    def from_config(cls, config, vision_aspect_ratio: str | None = None) -> "ImageGeometry":
        """The geometry of a `LladaVConfig`, with `vision_aspect_ratio` in place of the config's when given."""
        vision = config.vision_config
        return cls(vision.image_size, vision.image_size // vision.patch_size, config.image_grid_pinpoints,
                   vision_aspect_ratio or config.vision_aspect_ratio)

    def layouts(self, batch_num_images: list[int]) -> list[str]:
        """Each image's layout, from the number of images of each prompt."""
        if self.vision_aspect_ratio == SQUARE:
            return [CROP for count in batch_num_images for _ in range(count)]
        return [GRID if count == 1 else CROP_ROW for count in batch_num_images for _ in range(count)]

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of crops for an image of (height, width): the official / LLaVA-OneVision best-fit choice."""
        height, width = select_best_resolution(tuple(image_size), self.pinpoints)
        return height // self.crop_size, width // self.crop_size

    def num_crops(self, image_size: tuple[int, int], layout: str) -> int:
        """Crops the tower sees for one image: the base crop and the grid's, or one."""
        if layout != GRID:
            return 1
        rows, cols = self.grid(image_size)
        return 1 + rows * cols

    def unpadded_bounds(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the image's part of its grid's features (`unpad_bounds`)."""
        rows, cols = self.grid(image_size)
        return unpad_bounds(image_size, (rows * self.patches_per_side, cols * self.patches_per_side))

    def downscaled_size(self, rows: int, cols: int) -> tuple[int, int] | None:
        """The `anyres_max_N` target (rows, cols) of an unpadded feature grid with more than about N crops' worth
        of features (official: when sqrt(rows * cols / (N * unit²)) > 1.1), else None."""
        max_patches = max_num_patches(self.vision_aspect_ratio)
        if max_patches is None:
            return None
        times = math.sqrt(rows * cols / (max_patches * self.patches_per_side**2))
        return (int(rows // times), int(cols // times)) if times > 1.1 else None

    def num_tokens(self, image_size: tuple[int, int], layout: str) -> int:
        """Features of one image in `layout`, newlines included: the number of placeholders it needs."""
        unit = self.patches_per_side * self.patches_per_side
        if layout == CROP:
            return unit
        if layout == CROP_ROW:
            return unit + 1
        top, bottom, left, right = self.unpadded_bounds(image_size)
        height, width = bottom - top, right - left
        height, width = self.downscaled_size(height, width) or (height, width)
        return unit + height * (width + 1)


__all__ = ["ImageGeometry", "SQUARE", "GRID", "CROP_ROW", "CROP", "max_num_patches", "unpad_bounds"]
