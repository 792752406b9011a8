"""napari widgets of napari-cytoclip: Predict regions, Text query, Export annotations.

Thin Qt front ends over the compute core; per-prediction state lives in the Labels layer's
``metadata["cytoclip"]`` (see :mod:`.state`), loaded models on the Predict widget instance.
"""
from napari_cytoclip.widgets.runtime import block_triton_import

block_triton_import()  # before anything imports torch: see runtime.py (napari's canvas + triton = SIGSEGV)

from napari_cytoclip.widgets.export_widget import ExportWidget  # noqa: E402
from napari_cytoclip.widgets.predict_widget import PredictWidget  # noqa: E402
from napari_cytoclip.widgets.query_widget import QueryWidget  # noqa: E402
from napari_cytoclip.widgets.state import META_KEY, PredictionState, state_of  # noqa: E402

__all__ = ["PredictWidget", "QueryWidget", "ExportWidget", "PredictionState", "state_of", "META_KEY"]
