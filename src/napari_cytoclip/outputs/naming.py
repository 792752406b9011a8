"""Results-folder names and progress bars shared by the CLI and the distributed runner."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from napari_cytoclip.errors import OutputError, SectionError


def image_stem(path: Path) -> str:
    """The results folder name for an image: its name without the (OME-)TIFF/image suffix."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def results_targets(images: Sequence[Path], out: Path, overwrite: bool) -> list[Path]:
    """``out/<stem>`` for each image, refused up front when missing, clashing, already there or not ours."""
    from napari_cytoclip.io.safe_files import check_output_folder

    images = [Path(p) for p in images]
    targets = []
    for image in images:
        if not image.is_file():
            raise SectionError(image, "no such file" if not image.exists() else "is not a file")
        targets.append(Path(out) / image_stem(image))
    seen: dict[Path, Path] = {}
    for image, target in zip(images, targets):
        if target in seen:
            raise OutputError(target, f"{seen[target]} and {image} would share this results folder; rename one")
        seen[target] = image
    for target in targets:
        check_output_folder(target, overwrite, inputs=images)
    return targets


def progress_bar(total: int | None, desc: str, quiet: bool, unit: str = "tile") -> Any:
    """A tqdm bar on stderr (disabled when ``quiet``) that leaves no line behind."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=quiet, leave=False, dynamic_ncols=True)
