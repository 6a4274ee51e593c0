"""npe2 sample data: a synthetic abdominal CT phantom with its ground truth, and the demo checkpoint.

The phantom is generated on the fly (``core.phantom.make_phantom("ct", seed)``) and opened exactly
like a file read by this plugin (same geometry convention, same metadata), so the writer and the
widget work on it unchanged. The bundled demo checkpoint is ``resources/demo_unet_dual.pt``
(``demo_checkpoint_path()``); opening the sample selects it in the APL widget when that is docked.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ._layers import ct_display_window, image_layer_data, labels_layer_data
from .core.volume import volume_from_array

DEMO_CHECKPOINT_NAME = "demo_unet_dual.pt"
SAMPLE_SEED = 0
SAMPLE_IMAGE_NAME = "phantom CT"
SAMPLE_LABELS_NAME = "phantom CT ground truth"


def demo_checkpoint_path() -> Path | None:
    """Return the bundled demo checkpoint (installed package, then source checkout), or ``None``."""
    candidates = []
    try:
        candidates.append(Path(str(resources.files("napari_apl") / "resources" / DEMO_CHECKPOINT_NAME)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - namespace oddities
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "resources" / DEMO_CHECKPOINT_NAME)
    for cand in candidates:
        if cand.is_file():
            return cand
    return None


def phantom_layers(seed: int = SAMPLE_SEED, **phantom_kwargs: object) -> list[tuple]:
    """Return the CT phantom and its ground truth as napari layer data tuples."""
    from .core.phantom import make_phantom

    image, labels, affine = make_phantom("ct", seed, **phantom_kwargs)
    image_vol = volume_from_array(image, affine)
    label_vol = volume_from_array(labels, affine)
    checkpoint = demo_checkpoint_path()
    info = {"checkpoint": str(checkpoint) if checkpoint else None, "phantom_seed": seed}
    img = image_layer_data(image_vol, SAMPLE_IMAGE_NAME, contrast_limits=ct_display_window())
    img[1]["metadata"]["napari_apl"].update(info)
    lab = labels_layer_data(label_vol, SAMPLE_LABELS_NAME, opacity=0.5)
    lab[1]["metadata"]["napari_apl"].update(info)
    return [img, lab]


def ct_phantom() -> list[tuple]:
    """npe2 sample: the CT phantom with ground truth; selects the demo model in a docked APL widget."""
    layers = phantom_layers()
    _select_demo_in_widget()
    return layers


def _select_demo_in_widget() -> None:
    """If the APL widget is docked in the current viewer, point it at the demo checkpoint."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt / no viewer: nothing to update
        return
    if viewer is None:
        return
    from .widgets import find_apl_widget

    widget = find_apl_widget(viewer)
    if widget is not None and widget.controller.model is None:
        widget.use_demo_checkpoint()
