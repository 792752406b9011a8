"""Packaging: the npe2 manifest validates, and a wheel built from the source tree carries the manifest
(as a real file), the shipped model and the sample, and registers the plugin once installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "napari_cytoclip"
MANIFEST = PACKAGE / "napari.yaml"
BUNDLE = PACKAGE / "models" / "cytoclip-allen-mouse"
SAMPLE = PACKAGE / "data" / "sample"
# what a wheel needs from the source tree (the package's napari.yaml may be a link to the root one)
SOURCE_FILES = ["pyproject.toml", "setup.cfg", "README.md", "LICENSE", "napari.yaml", "MANIFEST.in"]

needs_manifest = pytest.mark.skipif(not MANIFEST.exists(), reason="src/napari_cytoclip/napari.yaml is not written yet")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, **kw)


@needs_manifest
def test_npe2_validate():
    proc = run([sys.executable, "-m", "npe2", "validate", "napari-cytoclip"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


@needs_manifest
def test_manifest_is_found_as_a_package_resource():
    """npe2 resolves the entry point 'napari_cytoclip:napari.yaml' inside the imported package."""
    from importlib.metadata import entry_points
    from importlib.resources import files

    import napari_cytoclip

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-cytoclip"]
    assert [ep.value for ep in eps] == ["napari_cytoclip:napari.yaml"]
    assert (files(napari_cytoclip) / "napari.yaml").is_file()


def _setuptools_is_recent() -> bool:
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77  # PEP 639 'license = "BSD-3-Clause"'
    except Exception:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the working tree gets no build/ or egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"
    src.mkdir()
    for name in SOURCE_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name, follow_symlinks=True)
    shutil.copytree(ROOT / "src", src / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp / "dist"
    if _setuptools_is_recent():
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src]
    else:  # an isolated build fetches its own setuptools
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, src]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("napari_cytoclip-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


@needs_manifest
def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        names = set(infos)
        manifest = infos["napari_cytoclip/napari.yaml"]
        assert (manifest.external_attr >> 16) & 0o170000 != 0o120000, "napari.yaml is stored as a symlink"
        text = zf.read(manifest).decode()
        assert text == MANIFEST.read_text() and "name: napari-cytoclip" in text
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "napari-cytoclip = napari_cytoclip:napari.yaml" in entry_points
    assert "napari-cytoclip = napari_cytoclip.cli:main" in entry_points
    for module in ("io/sections", "io/tissue", "inference/grid", "inference/windows", "models/bundle", "models/model",
                   "inference/predict", "inference/aggregate", "teach/teaching", "models/learner", "outputs/geojson"):
        assert f"napari_cytoclip/{module}.py" in names
    shipped = [p for p in (list(BUNDLE.glob("*")) + list(SAMPLE.glob("*"))) if p.is_file()]
    for path in shipped:
        rel = path.relative_to(PACKAGE.parent).as_posix()
        assert rel in names, f"{rel} is missing from the wheel"
        assert infos[rel].file_size == path.stat().st_size, rel
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


@needs_manifest
def test_installed_wheel_registers_the_plugin(wheel, tmp_path):
    """Install the wheel alone (--no-deps) into a fresh venv that borrows this environment's packages
    through a .pth path, so napari_cytoclip itself can only come from the wheel."""
    venv = tmp_path / "venv"
    proc = run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert proc.returncode == 0, proc.stderr
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    proc = run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # plain paths, not site dirs: the development (editable) install's own .pth is not processed
    (site / "zz_parent_env.pth").write_text("\n".join(parents) + "\n")
    check = textwrap.dedent(f"""
        import importlib.metadata as md
        from importlib.resources import files
        from pathlib import Path
        import napari_cytoclip
        site = Path({str(site)!r}).resolve()
        assert Path(napari_cytoclip.__file__).resolve().is_relative_to(site), napari_cytoclip.__file__
        dist = md.distribution("napari-cytoclip")
        assert Path(dist.locate_file("")).resolve() == site, dist.locate_file("")
        eps = [ep for ep in dist.entry_points if ep.group == "napari.manifest"]
        assert [ep.value for ep in eps] == ["napari_cytoclip:napari.yaml"], eps
        manifest = files(napari_cytoclip) / "napari.yaml"
        assert manifest.is_file() and not Path(str(manifest)).is_symlink()
        from npe2 import PluginManager, PluginManifest
        mf = PluginManifest.from_distribution("napari-cytoclip")
        assert mf.name == "napari-cytoclip", mf.name
        pm = PluginManager()
        pm.discover(include_npe1=False)
        assert "napari-cytoclip" in [m.name for m in pm.iter_manifests()]
        print("registered", mf.name, mf.package_metadata.version)
    """)
    proc = run([py, "-c", check], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "registered napari-cytoclip" in proc.stdout
