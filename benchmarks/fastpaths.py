"""CPU execution paths of the image tower, shared by the benchmarks (not a benchmark itself).

Every path maps the normalised float32 NCHW batch that :meth:`CytoClip.preprocess` builds (before
its dtype cast) to un-normalised float32 embeddings:

* ``fp32``          plain eager float32, NCHW (contiguous) memory format: the reference;
* ``channels_last`` eager float32, channels-last weights and inputs (what ``CytoClip`` does on CPU);
* ``jit``           channels_last, ``torch.jit.trace`` + ``freeze`` + ``optimize_for_inference``
                    (folds BatchNorm into the convolutions, prepacks oneDNN weights);
* ``compile``       channels_last + ``torch.compile`` (inductor), fixed batch shape (last batch padded);
* ``int8``          ``torch.ao.quantization.quantize_dynamic`` on the Linear layers (EfficientNet-Lite0
                    has one: the 1280->256 projection), channels_last;
* ``bf16``          the whole tower in bfloat16 (what ``load_model(precision="bf16")`` does); emulated
                    and very slow on CPUs without AVX-512-BF16/AMX;
* ``bf16sim``       float32 arithmetic on bfloat16-rounded weights, inputs and every module's output:
                    the numerics of native bf16 kernels (bf16 operands, fp32 accumulation, bf16 results)
                    at fp32 speed, for measuring label agreement where bf16 is not native. Checked
                    against ``bf16`` on a subset by ``bench_agreement.py``.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Callable

import numpy as np

PATHS = ("fp32", "channels_last", "jit", "compile", "int8", "bf16", "bf16sim")


def machine() -> str:
    """CPU model, core count, bf16 support and load average, for the benchmark tables."""
    import platform

    import torch

    from napari_cytoclip.models.model import cpu_supports_bf16

    name = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{name}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"SIMD {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_supports_bf16()}, "
            f"load average {load[0]:.1f}")


def normalised_batch(model, windows: np.ndarray):
    """float32 NCHW tensor (contiguous), normalised as the model expects."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(windows)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(model.input.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.input.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _round_bf16(t):
    import torch

    return t.to(torch.bfloat16).to(torch.float32) if torch.is_tensor(t) and t.is_floating_point() else t


def bf16_simulated(visual):
    """A float32 copy of ``visual`` whose weights and every leaf module's inputs/outputs are rounded to bf16."""
    import torch

    sim = copy.deepcopy(visual).float()
    with torch.no_grad():
        for t in list(sim.parameters()) + list(sim.buffers()):
            if t.is_floating_point():
                t.copy_(_round_bf16(t))
    for mod in sim.modules():
        if next(mod.children(), None) is None:  # leaf
            mod.register_forward_pre_hook(lambda m, args: tuple(_round_bf16(a) for a in args))
            mod.register_forward_hook(lambda m, args, out: _round_bf16(out))
    return sim


def build(path: str, model, batch_size: int = 128) -> Callable:
    """``f(x)`` for ``path``: normalised float32 NCHW batch -> float32 embeddings ``(B, D)``."""
    import torch

    visual = model.model.visual
    if model.image_dtype != torch.float32:
        raise ValueError("build the paths from an fp32 CytoClip (load_model(..., precision='fp32'))")
    cl = torch.channels_last

    def run(module, layout, dtype=torch.float32, pad_to: int | None = None):
        def f(x):
            n = len(x)
            if pad_to and n < pad_to:
                x = torch.cat([x, x[-1:].expand(pad_to - n, *x.shape[1:])])
            x = x.contiguous(memory_format=layout).to(dtype)
            with torch.inference_mode():
                return module(x)[:n].float()
        return f

    if path == "fp32":
        return run(copy.deepcopy(visual).to(memory_format=torch.contiguous_format), torch.contiguous_format)
    if path == "channels_last":
        return run(copy.deepcopy(visual).to(memory_format=cl), cl)
    if path == "jit":
        example = torch.zeros(batch_size, 3, model.input.size, model.input.size).contiguous(memory_format=cl)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(copy.deepcopy(visual).eval().to(memory_format=cl), example)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        return run(frozen, cl)
    if path == "compile":
        compiled = torch.compile(copy.deepcopy(visual).to(memory_format=cl), dynamic=False)
        return run(compiled, cl, pad_to=batch_size)
    if path == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(visual).to(memory_format=cl),
                                                       {torch.nn.Linear}, dtype=torch.qint8)
        return run(q, cl)
    if path == "bf16":
        return run(copy.deepcopy(visual).to(memory_format=cl).to(torch.bfloat16), cl, torch.bfloat16)
    if path == "bf16sim":
        return run(bf16_simulated(visual).to(memory_format=cl), cl)
    raise ValueError(f"unknown path {path!r} (one of {', '.join(PATHS)})")


def warm(f, x, seconds: float = 0.0) -> float:
    """Call ``f`` once (oneDNN/inductor warm-up); returns the seconds it took."""
    t = time.perf_counter()
    f(x)
    if seconds:
        while time.perf_counter() - t < seconds:
            f(x)
    return time.perf_counter() - t


def encode(f, model, windows: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """L2-normalised float32 embeddings of uint8 windows through path ``f``."""
    import torch

    out = []
    for i in range(0, len(windows), batch_size):
        e = f(normalised_batch(model, windows[i:i + batch_size]))
        out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
