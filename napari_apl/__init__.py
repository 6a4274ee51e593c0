"""napari-apl: adaptive pseudo labelling (APL) for source-free MRI to CT segmentation in napari."""

__version__ = "0.1.0"
