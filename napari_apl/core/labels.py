"""The label scheme used everywhere in napari-apl."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("background", "liver", "right kidney", "left kidney", "spleen")
ORGANS: tuple[int, ...] = (1, 2, 3, 4)
NUM_CLASSES = len(CLASS_NAMES)

# RGBA in 0..1, chosen to be distinct on a grey CT and for common colour-vision deficiencies.
LABEL_COLORS: dict[int, tuple[float, float, float, float]] = {
    0: (0.0, 0.0, 0.0, 0.0),
    1: (0.90, 0.38, 0.0, 1.0),  # liver: orange
    2: (0.0, 0.45, 0.70, 1.0),  # right kidney: blue
    3: (0.0, 0.62, 0.45, 1.0),  # left kidney: bluish green (sky blue read as the right kidney's blue)
    4: (0.80, 0.47, 0.65, 1.0),  # spleen: reddish purple
}
