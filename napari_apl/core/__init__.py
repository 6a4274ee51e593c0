"""Pure compute core of napari-apl: no Qt or napari imports below this package."""
