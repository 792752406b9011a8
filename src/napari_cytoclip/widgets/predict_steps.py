"""The work of one Predict run, as a generator the thread worker drives (no Qt, no layers)."""
from __future__ import annotations

from pathlib import Path
from typing import Generator

from napari_cytoclip.widgets.state import PredictionState

WORKER_NICE = 5  # CPU priority (Linux nice value) of the run's own thread: below the UI thread


def prediction_steps(state: PredictionState, device: str, batch_size: int,
                     cache: Path | None = None) -> Generator:
    """Load the model if needed (yields ``("model", model)``), then yield BatchResults; returns the Prediction.

    With ``cache``: a cache there made for this image, model, grid and precision is loaded instead of
    predicting (yields ``("cached", folder)``); otherwise the new prediction is saved there (an older
    cache in that folder is replaced). The work runs in a thread this package creates for the run, at
    a lower CPU priority (``WORKER_NICE``), so the thread worker driving it (a pooled Qt thread) keeps
    its own priority. It only reads ``state``'s inputs and never touches layers.
    """
    from napari_cytoclip.inference.cputhreads import run_in_owned_thread

    return run_in_owned_thread(_steps(state, device, batch_size, cache), niceness=WORKER_NICE,
                               name="cytoclip-predict")


def _steps(state: PredictionState, device: str, batch_size: int, cache: Path | None) -> Generator:
    from napari_cytoclip.errors import CacheMismatch
    from napari_cytoclip.inference.cache import expected_signature, is_cache, load_prediction, save_prediction
    from napari_cytoclip.inference.predict import predict_iter
    from napari_cytoclip.models.model import load_model

    model = state.model
    if model is None:
        model = load_model(state.bundle, device=device, precision="auto")
        yield ("model", model)
    if cache is not None and is_cache(cache):
        try:
            prediction = load_prediction(cache, expected_signature(state.section, model.identity, state.grid),
                                         lazy=False)
        except CacheMismatch:
            prediction = None  # another image, model, grid or precision: predict and replace it
        if prediction is not None:
            from napari_cytoclip.inference.taught_decode import apply_learner

            apply_learner(prediction, model, state.section)  # the cache is the base model's; a taught one relabels
            yield ("cached", cache)
            return prediction
    prediction = yield from predict_iter(state.section, model, stride_um=state.stride_um, batch_size=batch_size)
    if cache is not None:
        save_prediction(prediction, cache)
        yield ("saved", cache)
    return prediction
