"""Prediction on a dask.distributed cluster: many sections, and the tiles of one huge section.

``napari-cytoclip predict ... --scheduler local:N`` starts a :class:`distributed.LocalCluster` of N
single-threaded worker processes; ``--scheduler tcp://host:8786`` uses a running cluster (its
workers must see the image, model and output paths at the same places as the client, e.g. a shared
file system).

Two kinds of task, both running exactly the batches the single-process :func:`predict.predict_section`
runs, so the grid, cells and labels are the same:

* **whole section** (:func:`_predict_file_task`): a worker opens the section, predicts it with the
  same code as one process and writes its results folder with
  :func:`outputs.write_prediction_folder`;
* **chunk of cells** (:func:`_encode_chunk_task`), for huge sections: the client plans the grid and
  tissue cells (:func:`predict.plan_grid`); each worker opens the section lazily itself, reads its
  own windows with :class:`windows.WindowReader` and returns float16 embeddings of its cells; the
  client gathers them in order and decodes the labels (:func:`predict.decode_labels`). Chunks are a
  multiple of the batch size and start on batch boundaries, so every batch the encoder sees is
  the one the single-process run sees.

Embeddings and confidences match to float rounding, not always bit for bit: oneDNN picks its
kernels' blocking by thread count, and workers run one thread each. Measured here (shipped model,
batch 64, bf16): plate 40 at 100 um, 9 of 3,745 float16 embeddings differ, by at most 0.0007;
confidence by at most 2e-5; labels identical. float32 alone differs by 4e-8 between 1 and 2 threads.

Each worker loads a model once (per bundle, device and precision) and keeps it on the
:class:`distributed.Worker` object, not in a module-level global.
"""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from napari_cytoclip.errors import CytoclipError, SectionError
from napari_cytoclip.outputs.naming import results_targets

DEFAULT_CHUNK_CELLS = 4096
DEFAULT_SPLIT_CELLS = 2 * DEFAULT_CHUNK_CELLS  # grid cells above which a TIFF section is split
WORKER_MODELS_ATTR = "_cytoclip_models"
WORKER_LOCK_ATTR = "_cytoclip_models_lock"
SCHEDULER_TIMEOUT_S = 20.0  # seconds a scheduler address has to answer (connect and handshake)
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".ndpi", ".scn"}


# --------------------------------------------------------------------------------- clusters
@contextlib.contextmanager
def connect(scheduler: Any, timeout: float | None = None) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``local:N``, ``local`` (one worker per core), a scheduler
    address, or an existing Client (used as is and left open). An address that does not answer as a
    dask scheduler within ``timeout`` s (default :data:`SCHEDULER_TIMEOUT_S`) is a :class:`CytoclipError`."""
    from distributed import Client

    if isinstance(scheduler, Client):
        yield scheduler
        return
    text = str(scheduler or "").strip()
    if not text:
        raise ValueError("--scheduler needs 'local:N' or a scheduler address such as tcp://host:8786")
    if text == "local" or text.startswith("local:"):
        import os

        from distributed import LocalCluster

        count = text.partition(":")[2] or str(os.cpu_count() or 1)
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--scheduler local:N needs a whole number of workers, got {count!r}") from None
        if n < 1:
            raise ValueError(f"--scheduler local:N needs at least one worker, got {n}")
        import logging

        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        try:
            client = Client(cluster)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
        return
    timeout = SCHEDULER_TIMEOUT_S if timeout is None else float(timeout)
    check_scheduler(text, timeout)
    try:
        client = Client(text, timeout=f"{timeout}s")
    except (Exception, MemoryError) as exc:  # noqa: BLE001 - distributed raises many kinds for a wrong peer
        raise _not_a_scheduler(text, timeout, exc) from None
    try:
        yield client
    finally:
        client.close()


def check_scheduler(address: str, timeout: float | None = None) -> None:
    """Raise :class:`CytoclipError` unless a dask scheduler answers at ``address`` within ``timeout`` s.

    ``distributed.Client`` alone waits for ever on a peer that accepts and stays silent (its
    handshake read has no timeout), and reads another protocol's greeting as a frame length
    (a MemoryError or a traceback); this probe bounds the whole exchange.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect as comm_connect

    timeout = SCHEDULER_TIMEOUT_S if timeout is None else float(timeout)

    async def identity() -> Any:
        comm = await comm_connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    def probe() -> Any:  # a loop of its own, in a thread: the caller may be running one already
        return asyncio.run(asyncio.wait_for(identity(), timeout))

    try:
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(probe).result()
    except (Exception, MemoryError) as exc:  # noqa: BLE001 - any failure means "not a scheduler here"
        raise _not_a_scheduler(address, timeout, exc) from None
    if not (isinstance(reply, dict) and "Scheduler" in str(reply.get("type"))):  # Scheduler or a subclass
        kind = reply.get("type") if isinstance(reply, dict) else type(reply).__name__
        raise CytoclipError(None, f"{address} did not answer as a dask scheduler (it answered as {kind!r})")


def _not_a_scheduler(address: str, timeout: float, exc: BaseException) -> CytoclipError:
    import asyncio

    text = " ".join(str(exc).split())
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or text.startswith("Timed out"):
        why = f"no answer within {timeout:g} s"
    elif isinstance(exc, MemoryError):  # another protocol's greeting read as a dask frame length
        why = "it speaks another protocol"
    else:
        why = f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
    return CytoclipError(None, f"{address} did not answer as a dask scheduler ({why}); check --scheduler")


def _this_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not running inside a dask worker
        return None


def worker_model(model_path: str | None, device: str = "auto", precision: str = "auto"):
    """The model for ``(model_path, device, precision)``, loaded once per dask worker and kept on it.

    Outside a worker (a plain call) the model is loaded and not kept.
    """
    from napari_cytoclip.models.model import load_model

    worker = _this_worker()
    if worker is None:
        return load_model(model_path, device=device, precision=precision)
    lock = vars(worker).setdefault(WORKER_LOCK_ATTR, threading.Lock())  # setdefault is atomic
    key = (None if model_path is None else str(Path(model_path).resolve()), device, precision)
    with lock:
        models = vars(worker).setdefault(WORKER_MODELS_ATTR, {})
        if key not in models:
            models[key] = load_model(model_path, device=device, precision=precision)
        return models[key]


# --------------------------------------------------------------------------------- worker tasks
class RemoteError(Exception):
    """A :class:`CytoclipError` raised on a worker, in a form that pickles (``CytoclipError`` takes two
    arguments but pickles one); :meth:`restore` rebuilds the original error on the client."""

    def __init__(self, module: str, name: str, source: str | None, problem: str):
        super().__init__(module, name, source, problem)

    def restore(self) -> Exception:
        import importlib

        module, name, source, problem = self.args
        try:
            cls = getattr(importlib.import_module(module), name)
            return cls(source, problem)
        except Exception:  # an error class the client cannot import: keep the message
            return CytoclipError(source, problem)

    def __str__(self) -> str:
        return f"{self.args[2]}: {self.args[3]}" if self.args[2] else str(self.args[3])


def _local_dask():
    """Lazy (dask) section levels computed in this process, not shipped to the cluster: a
    ``distributed.Client`` becomes dask's default scheduler, and a TIFF level's zarr store holds an
    open file that cannot be pickled."""
    import dask

    return dask.config.set(scheduler="synchronous")


@contextlib.contextmanager
def _portable_errors() -> Iterator[None]:
    """Worker-task context: local dask reads, and errors that survive the trip to the client."""
    try:
        with _local_dask():
            yield
    except CytoclipError as exc:
        raise RemoteError(type(exc).__module__, type(exc).__qualname__, exc.source, exc.problem) from None


def _local_error(exc: BaseException) -> BaseException:
    return exc.restore() if isinstance(exc, RemoteError) else exc


def _predict_file_task(image: str, target: str, model_path: str | None, pixel_size_um: float | None,
                       stride_um: float | None, batch_size: int, overwrite: bool, full_resolution: bool,
                       device: str, precision: str) -> str:
    """Predict one section file and write its results folder (the single-process code path)."""
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section

    with _portable_errors():
        model = worker_model(model_path, device, precision)
        section = open_section(image, pixel_size_um=pixel_size_um)
        try:
            section.require_pixel_size()
            prediction = predict_section(section, model, stride_um=stride_um, batch_size=batch_size)
            write_prediction_folder(prediction, section, target, overwrite=overwrite,
                                    full_resolution=full_resolution)
        finally:
            section.close()
    return target


def _model_info_task(model_path: str | None, device: str, precision: str) -> dict:
    """What the client needs to decode embeddings: region embeddings, logit scale, embedding size."""
    with _portable_errors():
        model = worker_model(model_path, device, precision)
    return {"region_embeddings": model.region_embeddings(), "logit_scale": float(model.logit_scale),
            "embed_dim": int(model.embed_dim), "region_ids": [r.id for r in model.regions],
            "identity": model.identity}


def _encode_chunk_task(image: str, pixel_size_um: float | None, model_path: str | None, device: str,
                       precision: str, polarity: str, grid: dict, cells: np.ndarray, batch_size: int) -> dict:
    """Float16 embeddings (and pooled features) of ``cells``, by the same loop as one process
    (:func:`encode.encode_cells`): the section is opened here, lazily, and only these windows read."""
    from napari_cytoclip.inference.encode import encode_cells
    from napari_cytoclip.inference.grid import TileGrid
    from napari_cytoclip.io.sections import open_section

    with _portable_errors():
        model = worker_model(model_path, device, precision)
        t0 = time.perf_counter()
        section = open_section(image, pixel_size_um=pixel_size_um)
        try:
            cells = np.asarray(cells, np.int32).reshape(-1, 2)
            out = np.zeros((len(cells), model.embed_dim), np.float16)
            features: np.ndarray | None = None
            t_encode = 0.0
            for batch in encode_cells(section, model, TileGrid.from_dict(grid), cells, polarity=polarity,
                                      batch_size=batch_size):
                t_encode += batch.encode_s
                out[batch.start:batch.start + len(batch.embeddings)] = batch.embeddings
                if batch.features is not None:
                    if features is None:
                        features = np.zeros((len(cells), batch.features.shape[1]), np.float16)
                    features[batch.start:batch.start + len(batch.features)] = batch.features
        finally:
            section.close()
    return {"embeddings": out, "features": features, "encode_s": t_encode, "total_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------- one huge section
class _SplitJob:
    """A section planned on the client and encoded as chunks of cells by the workers."""

    def __init__(self, client: Any, section_path: Path, model_path: str | None, bundle: Any, info_future: Any, *,
                 pixel_size_um: float | None, stride_um: float | None, batch_size: int, chunk_cells: int,
                 device: str, precision: str, section: Any = None):
        from napari_cytoclip.inference.predict import plan_grid
        from napari_cytoclip.io.sections import open_section

        self.t0 = time.perf_counter()
        self.path = Path(section_path)
        self.section = section if section is not None else open_section(self.path, pixel_size_um=pixel_size_um)
        self.section.require_pixel_size()
        self.bundle = bundle
        self.info_future = info_future
        with _local_dask():
            self.grid, self.cells, self.mask = plan_grid(self.section, bundle, stride_um)
        self.t_plan = time.perf_counter() - self.t0
        chunk = max(batch_size, (int(chunk_cells) // batch_size) * batch_size)  # whole batches only
        self.starts = list(range(0, len(self.cells), chunk))
        self.chunk = chunk
        self.embeddings: np.ndarray | None = None
        self.features: Any = None  # a row_store (numpy, or a temporary zarr array for large sections)
        self.has_features = True
        self.remaining = len(self.starts)
        self.encode_s = 0.0
        px = self.section.pixel_size_um
        self.futures = [client.submit(_encode_chunk_task, str(self.path), px, model_path, device, precision,
                                      self.mask.polarity, self.grid.to_dict(), self.cells[s:s + chunk], batch_size,
                                      pure=False)
                        for s in self.starts]
        self.offsets = {f.key: s for f, s in zip(self.futures, self.starts)}

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def add(self, future: Any, result: dict) -> None:
        start = self.offsets[future.key]
        emb = result["embeddings"]
        if self.embeddings is None:
            self.embeddings = np.zeros((len(self.cells), emb.shape[1]), np.float16)
        self.embeddings[start:start + len(emb)] = emb
        feats = result.get("features")
        if feats is None:
            self.has_features = False
        elif self.has_features:
            if self.features is None:
                from napari_cytoclip.inference.encode import row_store

                self.features = row_store(len(self.cells), feats.shape[1])
            self.features[start:start + len(feats)] = feats
        self.encode_s += float(result["encode_s"])
        self.remaining -= 1

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()

    def finish(self):
        """The :class:`predict.Prediction`, decoded on the client from the gathered embeddings."""
        from dataclasses import replace

        from napari_cytoclip.inference.predict import Prediction, decode_labels, signature
        from napari_cytoclip.models.model import NO_FEATURES

        try:
            info = self.info_future.result()
        except RemoteError as exc:
            raise exc.restore() from None
        emb = self.embeddings if self.embeddings is not None else np.zeros((0, info["embed_dim"]), np.float16)
        labels, conf = decode_labels(self.cells, emb, info["region_embeddings"], info["region_ids"], self.grid,
                                     self.bundle.label_um, info["logit_scale"])
        total = time.perf_counter() - self.t0
        features = self.features if self.has_features and len(self.cells) else None
        kind = info["identity"].features if features is not None else NO_FEATURES
        with _local_dask():  # the workers' identity: the precision they ran at
            sig = signature(self.section, replace(info["identity"], features=kind), self.grid)
        return Prediction(grid=self.grid, cells=self.cells, embeddings=emb, regions=list(self.bundle.regions),
                          labels=labels, confidence=conf, signature=sig, features=features, feature_kind=kind,
                          label_um=self.bundle.label_um, logit_scale=info["logit_scale"],
                          polarity=self.mask.polarity, source=self.section.source or self.section.name,
                          model_name=self.bundle.name, model_path=str(self.bundle.path or ""),
                          timings={"plan_s": self.t_plan, "encode_s": self.encode_s, "total_s": total,
                                   "tiles_per_s": len(self.cells) / total if total else 0.0,
                                   "chunks": len(self.starts), "distributed": True})

    def close(self) -> None:
        self.section.close()


def _bundle_for(model_path: str | Path | None):
    from napari_cytoclip.models.bundle import BUNDLE_WEIGHTS, default_bundle_path, load_bundle
    from napari_cytoclip.errors import BundleError

    if model_path is None:
        path = default_bundle_path()
        if not (path / BUNDLE_WEIGHTS).is_file():
            raise BundleError(path, "the default model is not installed; pass a bundle folder with --model")
        return load_bundle(path)
    return load_bundle(model_path)


def predict_section_distributed(section_path: str | Path, client: Any, model_path: str | Path | None = None, *,
                                pixel_size_um: float | None = None, stride_um: float | None = None,
                                batch_size: int = 64, chunk_cells: int = DEFAULT_CHUNK_CELLS, device: str = "auto",
                                precision: str = "auto", progress: Callable[[int, int], None] | None = None):
    """Predict one (huge) section with its cells spread over ``client``'s workers.

    The client plans the grid and tissue cells; workers encode chunks of ``chunk_cells`` cells
    (rounded down to whole batches), each opening the section lazily itself; the client gathers the
    embeddings in order and decodes them. The result equals :func:`predict.predict_section`'s.
    ``progress(done_cells, total_cells)`` is called as chunks arrive.
    """
    from distributed import as_completed

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    model_path = None if model_path is None else str(model_path)
    bundle = _bundle_for(model_path)
    info = client.submit(_model_info_task, model_path, device, precision, pure=False)
    job = _SplitJob(client, Path(section_path), model_path, bundle, info, pixel_size_um=pixel_size_um,
                    stride_um=stride_um, batch_size=batch_size, chunk_cells=chunk_cells, device=device,
                    precision=precision)
    try:
        done_cells = 0
        for future, result in as_completed(job.futures, with_results=True):
            job.add(future, result)
            done_cells += len(result["embeddings"])
            future.release()
            if progress:
                progress(done_cells, len(job.cells))
        return job.finish()
    except RemoteError as exc:
        job.cancel()
        raise exc.restore() from None
    except BaseException:
        job.cancel()
        raise
    finally:
        job.close()


# --------------------------------------------------------------------------------- many sections
def _grid_cells(section: Any, bundle: Any, stride_um: float | None) -> int:
    from napari_cytoclip.inference.grid import TileGrid

    grid = TileGrid.covering(section.shape, section.require_pixel_size(), float(stride_um or bundle.stride_um))
    return int(np.prod(grid.shape))


def predict_many(images: Sequence[str | Path], out: str | Path, *, model: str | Path | None = None,
                 model_path: str | Path | None = None, scheduler: Any, pixel_size_um: float | None = None,
                 stride_um: float | None = None, batch_size: int = 64, overwrite: bool = False,
                 full_resolution: bool = False, device: str = "auto", precision: str = "auto",
                 progress: Callable[[int, int], None] | None = None, chunk_cells: int | None = None,
                 split_cells: int | None = None) -> list[Path]:
    """Predict every image on a dask cluster; results go to ``out/<image name>/`` as with one process.

    ``scheduler``: ``local:N``, a scheduler address or a :class:`distributed.Client`. Sections are
    one task each, except TIFF sections whose grid has more than ``split_cells`` cells (default
    :data:`DEFAULT_SPLIT_CELLS`), which are split into chunks of cells across the workers (planned,
    gathered, decoded and written by the client). ``model`` and ``model_path`` are synonyms (the
    CLI passes ``model``). ``progress(done_sections, total_sections)``. Returns the results
    folders in the order of ``images``. Sections that fail do not stop the others; the error is
    raised at the end (the first one when only one failed).
    """
    from distributed import as_completed

    if model is not None and model_path is not None and Path(model) != Path(model_path):
        raise ValueError("give the model bundle once (model or model_path)")
    model_path = model if model is not None else model_path
    model_path = None if model_path is None else str(model_path)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    images = [Path(p) for p in images]
    targets = results_targets(images, Path(out), overwrite)  # the same names as the single-process CLI
    bundle = _bundle_for(model_path)
    split_cells = DEFAULT_SPLIT_CELLS if split_cells is None else int(split_cells)
    chunk_cells = DEFAULT_CHUNK_CELLS if chunk_cells is None else int(chunk_cells)
    total = len(images)
    failures: list[tuple[Path, BaseException]] = []
    with connect(scheduler) as client:
        info = None
        jobs: dict[Any, tuple[str, Any]] = {}  # future key -> ("file", index) or ("chunk", job)
        futures = []
        split_jobs: list[tuple[int, _SplitJob]] = []
        whole: list[int] = []
        try:
            for i, image in enumerate(images):  # huge TIFFs first: they are the long pole
                section = _open_for_split(image, pixel_size_um)
                if section is None:
                    whole.append(i)
                    continue
                try:
                    n_cells = _grid_cells(section, bundle, stride_um)
                except BaseException:
                    section.close()
                    raise
                if n_cells <= split_cells:
                    section.close()
                    whole.append(i)
                    continue
                if info is None:
                    info = client.submit(_model_info_task, model_path, device, precision, pure=False)
                job = _SplitJob(client, image, model_path, bundle, info, pixel_size_um=pixel_size_um,
                                stride_um=stride_um, batch_size=batch_size, chunk_cells=chunk_cells,
                                device=device, precision=precision, section=section)
                split_jobs.append((i, job))
                for f in job.futures:
                    jobs[f.key] = ("chunk", (i, job))
                    futures.append(f)
            for i in whole:
                f = client.submit(_predict_file_task, str(images[i]), str(targets[i]), model_path, pixel_size_um,
                                  stride_um, batch_size, overwrite, full_resolution, device, precision,
                                  pure=False)
                jobs[f.key] = ("file", i)
                futures.append(f)
            done = 0
            finished_jobs: set[int] = set()
            for future in as_completed(futures):
                kind, what = jobs[future.key]
                i, job = (what, None) if kind == "file" else what
                if i in finished_jobs:
                    continue
                if future.status == "error" or future.status == "cancelled":
                    exc = _local_error(future.exception()) if future.status == "error" \
                        else CytoclipError(images[i], "cancelled")
                    failures.append((images[i], exc))
                    finished_jobs.add(i)
                    if job is not None:
                        job.cancel()
                    done += 1
                elif kind == "file":
                    future.release()
                    done += 1
                else:
                    job.add(future, future.result())
                    future.release()
                    if job.done:
                        try:
                            write_split(job, targets[i], overwrite, full_resolution)
                        except Exception as exc:
                            failures.append((images[i], exc))
                        finished_jobs.add(i)
                        job.close()
                        done += 1
                    else:
                        continue
                if progress:
                    progress(done, total)
        finally:
            for _i, job in split_jobs:
                job.close()
    if failures:
        if len(failures) == 1:
            raise failures[0][1]
        first_image, first = failures[0]
        raise CytoclipError(None, f"{len(failures)} of {total} sections failed; the first, {first_image}: {first}")
    return targets


def _open_for_split(image: Path, pixel_size_um: float | None):
    """The section opened lazily on the client when it is a TIFF (a candidate for splitting), else None."""
    from napari_cytoclip.io.sections import open_section

    if image.suffix.lower() not in TIFF_SUFFIXES:
        return None
    with _local_dask():
        section = open_section(image, pixel_size_um=pixel_size_um)
    if section.pixel_size_um is None:
        section.close()
        raise SectionError(image, "the pixel size is unknown: give it in micrometres per pixel (--pixel-size)")
    return section


def write_split(job: _SplitJob, target: Path, overwrite: bool, full_resolution: bool) -> Path:
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    prediction = job.finish()
    with _local_dask():
        return write_prediction_folder(prediction, job.section, target, overwrite=overwrite,
                                       full_resolution=full_resolution)
