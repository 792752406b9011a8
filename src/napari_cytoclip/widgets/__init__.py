"""napari widgets of napari-cytoclip: Predict regions, Text query, Export annotations.

Thin Qt front ends over the compute core; per-prediction state lives in the Labels layer's
``metadata["cytoclip"]`` (see :mod:`.state`), loaded models on the Predict widget instance.
"""
from .runtime import block_triton_import

block_triton_import()  # before anything imports torch: see runtime.py (napari's canvas + triton = SIGSEGV)

from .export_widget import ExportWidget  # noqa: E402
from .predict_widget import PredictWidget  # noqa: E402
from .query_widget import QueryWidget  # noqa: E402
from .state import META_KEY, PredictionState, state_of  # noqa: E402

__all__ = ["PredictWidget", "QueryWidget", "ExportWidget", "PredictionState", "state_of", "META_KEY"]
