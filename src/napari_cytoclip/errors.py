"""Errors that name the file and the problem, for users rather than developers."""
from __future__ import annotations

from pathlib import Path


class CytoclipError(Exception):
    """Base error: ``source`` is the file or folder concerned, ``problem`` what is wrong."""

    def __init__(self, source: str | Path | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


class SectionError(CytoclipError):
    """A section image cannot be read or is not usable."""


class BundleError(CytoclipError):
    """A model bundle is missing, malformed or does not match its weights."""


class OutputError(CytoclipError):
    """An output cannot be written safely."""


class CacheMismatch(CytoclipError):
    """A cached embedding set belongs to another section, model or grid."""


class Cancelled(Exception):
    """Raised inside long work when the caller asked to stop."""
