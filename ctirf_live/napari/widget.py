"""napari widget: restore the chosen image layer to cTIRF with a chosen model.

The model is anything `-m` takes (a shipped name, a run folder, a checkpoint, a
bioimage.io zip from `ctirf export`). The restoration runs on a worker thread, so the
viewer stays responsive; the result is added as `cTIRF <layer>` with the layer's scale.
`restore_array` and `ctirf_layer` need no napari (they are what the widget calls).
"""

import functools
from typing import Any

import numpy as np

from ctirf_live.inference.restorer import Restorer, pixel_size_warning
from ctirf_live.napari.reader import contrast_limits

DEFAULT_MODEL = "et2dnet_s0_60x_sim"
DEVICES = ("auto", "cpu", "cuda", "mps")


@functools.lru_cache(maxsize=2)
def cached_restorer(model: str, device: str, tile: int) -> Restorer:
    """A Restorer per (model, device, tile), kept so repeated clicks do not reload."""
    return Restorer(model, device=device, tile=tile)


def restore_array(data: Any, restorer: Restorer) -> np.ndarray:
    """cTIRF of a layer's data: frames `(..., Y, X)` (2D model) or stacks `(..., Z, Y, X)`
    (3D model), any leading axes (time, channel) restored item by item."""
    arr = np.asarray(data)
    item = 2 if restorer.dims == 2 else 3
    if arr.ndim < item:
        raise ValueError(
            f"{restorer.model.name} needs {'frames' if item == 2 else 'z-stacks'}; "
            f"the layer has shape {arr.shape}"
        )
    if arr.ndim <= item + 1:
        return restorer.restore(arr)
    flat = arr.reshape(-1, *arr.shape[-item:])
    return np.stack([restorer.restore(x) for x in flat]).reshape(arr.shape)


def ctirf_layer(
    name: str, data: Any, restorer: Restorer, scale: Any = None, translate: Any = None
) -> tuple[np.ndarray, dict[str, Any], str]:
    """The napari layer-data tuple of the restored layer `name`."""
    result = restore_array(data, restorer)
    kwargs: dict[str, Any] = {
        "name": f"cTIRF {name}",
        "contrast_limits": contrast_limits(result),
        "metadata": {"ctirf": restorer.describe()},
    }
    if scale is not None:
        kwargs["scale"] = tuple(scale)
    if translate is not None:
        kwargs["translate"] = tuple(translate)
    return result, kwargs, "image"


def restore_widget() -> Any:
    """npe2 widget command: the magicgui widget (napari and magicgui imported here)."""
    from magicgui import magicgui
    from napari.layers import Image
    from napari.qt.threading import FunctionWorker, thread_worker
    from napari.types import LayerDataTuple
    from napari.utils.notifications import show_warning

    @magicgui(
        call_button="Restore to cTIRF",
        model={"tooltip": "shipped name, run folder, .safetensors or exported .zip"},
        device={"choices": DEVICES},
        tile={"min": 64, "max": 4096, "step": 32, "tooltip": "tile size (px)"},
    )
    def restore(
        layer: Image, model: str = DEFAULT_MODEL, device: str = "auto", tile: int = 512
    ) -> FunctionWorker[LayerDataTuple]:
        if layer is None:
            raise ValueError("choose an image layer to restore")
        if layer.rgb:
            raise ValueError(f"{layer.name} is an RGB image; cTIRF needs a fluorescence channel")
        restorer = cached_restorer(model, device, tile)
        warning = pixel_size_warning(restorer.optics, float(layer.scale[-1]))
        if warning and abs(float(layer.scale[-1]) - 1.0) > 1e-9:  # scale 1: no pixel size
            show_warning(warning)
        data, name, scale, translate = layer.data, layer.name, layer.scale, layer.translate

        @thread_worker
        def work() -> LayerDataTuple:
            return ctirf_layer(name, data, restorer, scale, translate)

        return work()

    return restore
