"""Process-level precautions for running torch inside napari.

Importing ``triton`` (which ``torchvision`` -> ``torch._dynamo`` does while ``open_clip`` loads)
after napari has created its OpenGL canvas crashes the whole process with a segmentation fault
when OpenGL is Mesa (llvmpipe here; radeonsi and other LLVM-based drivers alike): triton's bundled
LLVM clashes with the ``libLLVM`` Mesa already loaded. Measured on this machine: a napari viewer,
then ``import triton`` -> SIGSEGV; ``import triton`` first, or not at all -> fine.

The widgets never need triton (no ``torch.compile`` inside napari), so before anything imports
torch they mark ``triton`` as not importable; torch then reports "no triton" and carries on.
Set ``CYTOCLIP_ALLOW_TRITON=1`` to opt out (e.g. with an NVIDIA OpenGL driver and a need for
``torch.compile`` in the napari process).
"""
from __future__ import annotations

import os
import sys


def block_triton_import() -> bool:
    """Make ``import triton`` raise ImportError unless it is already imported; returns whether it did."""
    if os.environ.get("CYTOCLIP_ALLOW_TRITON") == "1" or "triton" in sys.modules:
        return False
    sys.modules["triton"] = None  # the import system's documented "not importable" marker
    return True
