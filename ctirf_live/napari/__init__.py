"""napari plugin (npe2 manifest `ctirf_live/napari.yaml`): open ctirf datasets and stores,
save image layers as OME-TIFF, restore the current layer to cTIRF.

The reader and writer are plain functions (no napari import); the widget needs the
`napari` extra: pip install 'ctirf-live[napari]'.
"""
