"""What a benchmark prints, kept so that ``--section`` writes exactly this run's lines into a README."""
from __future__ import annotations

from pathlib import Path


class Report:
    """Printed lines, kept in order; :meth:`write` puts them between a README's markers (atomically)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, *parts, flush: bool = True) -> None:
        """Print a line and keep it."""
        line = " ".join(str(p) for p in parts)
        self.lines.append(line)
        print(line, flush=flush)

    def write(self, path: Path, marker: str, command: str) -> None:
        """The command, then the kept lines as a code block, between ``<!-- marker:begin/end -->`` in ``path``."""
        from napari_cytoclip.io.safe_files import write_between_markers

        write_between_markers(path, marker, "\n".join([f"    {command}", "", "```", *self.lines, "```"]))
