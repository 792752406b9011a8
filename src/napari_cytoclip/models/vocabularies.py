"""Region vocabularies: the Allen mouse coarse divisions and the 21 PCW fetal human preset."""
from __future__ import annotations

import colorsys
import csv
from pathlib import Path
from typing import Sequence

from napari_cytoclip.models.bundle import Region

DATA_DIR = Path(__file__).parents[1] / "data"

# (id, acronym, name, Allen colour, parent chain, description) - descriptions are cytoarchitecture
# in an anatomist's words, written for this project.
_ALLEN = [
    (1, "Isocortex", "Isocortex", "#70ff71", "cerebral cortex",
     "six-layered neocortex with a cell-sparse molecular layer, a dense granular layer 4 and large pyramidal neurons in layer 5"),
    (2, "OLF", "Olfactory areas", "#9ad2bd", "cerebral cortex",
     "olfactory bulb and piriform cortex with concentric glomerular, mitral and granule cell layers"),
    (3, "HPF", "Hippocampal formation", "#7ed04b", "cerebral cortex",
     "hippocampus and dentate gyrus, thin curved bands of densely packed pyramidal and granule cells"),
    (4, "CTXsp", "Cortical subplate", "#8ada87", "cerebral cortex",
     "claustrum, endopiriform nucleus and basolateral amygdala, deep cell groups beneath the cortex"),
    (5, "STR", "Striatum", "#98d6f9", "cerebral nuclei",
     "caudoputamen and nucleus accumbens, a uniform field of medium-sized neurons crossed by pale fibre bundles"),
    (6, "PAL", "Pallidum", "#8599cc", "cerebral nuclei",
     "globus pallidus and septal nuclei, cell-sparse tissue with scattered large neurons among fibres"),
    (7, "TH", "Thalamus", "#ff7080", "interbrain",
     "a mosaic of thalamic nuclei with evenly spaced medium-sized neurons"),
    (8, "HY", "Hypothalamus", "#e64438", "interbrain",
     "small densely packed nuclei around the third ventricle at the base of the brain"),
    (9, "MB", "Midbrain", "#ff64ff", "brain stem",
     "superior and inferior colliculi, periaqueductal grey around the aqueduct and the midbrain tegmentum"),
    (10, "P", "Pons", "#ff9b88", "hindbrain",
     "pontine nuclei and pontine reticular formation with large scattered neurons"),
    (11, "MY", "Medulla", "#ff9bcd", "hindbrain",
     "medullary reticular formation, cranial nerve nuclei and the inferior olive"),
    (12, "CB", "Cerebellum", "#f0f080", "cerebellum",
     "cerebellar folia with a very dense granule cell layer, a row of Purkinje cells and a pale molecular layer"),
    (13, "fiber tracts", "fiber tracts", "#cccccc", "white matter",
     "myelinated fibre bundles such as the corpus callosum and internal capsule, nearly free of cell bodies"),
    (14, "VS", "ventricular systems", "#aaaaaa", "ventricles",
     "fluid-filled ventricles lined by ependyma, with choroid plexus"),
]

# Free-text queries for checking that text generalises, written so that none shares a content word
# (compared by :func:`word_stem`) with any caption the shipped model was trained on
# (tests/test_vocabularies.py checks this). Most are expected to be hard: report them all.
ALLEN_PARAPHRASES = {
    1: ["motor and somatosensory territory", "visual and auditory territories"],
    2: ["odour-processing forebrain", "main smell relay"],
    3: ["Ammon's horn", "memory-forming archicortex"],
    4: ["structures under the insula", "fear-learning centre under the insular territory"],
    5: ["dorsal basal ganglia input station", "reward-related limbic hub"],
    6: ["substantia innominata", "basal ganglia output relay"],
    7: ["dorsal diencephalon", "lateral geniculate and pulvinar"],
    8: ["hormone control centre", "preoptic and mammillary territory"],
    9: ["substantia nigra and optic tectum", "mesencephalon"],
    10: ["locus coeruleus", "rostral metencephalon"],
    11: ["myelencephalon", "dorsal vagal complex and hypoglossal column"],
    12: ["vermis and paraflocculus", "motor coordination hub"],
    13: ["axon highways", "anterior commissure and optic chiasm"],
    14: ["CSF cavities", "cavities holding spinal liquor"],
}
STOPWORDS = frozenset("a an the of and or with in on at by as from to for its it s under".split())


def word_stem(word: str) -> str:
    """A crude stem for comparing vocabularies: lower case, plural ``s`` dropped, first 5 letters."""
    word = word.lower()
    if len(word) > 3 and word.endswith("s"):
        word = word[:-1]
    return word[:5]


def content_stems(text: str) -> set[str]:
    """Stems of the content words of ``text`` (stop words and numbers left out)."""
    import re

    return {word_stem(w) for w in re.findall(r"[A-Za-z]+", text) if w.lower() not in STOPWORDS}


def allen_mouse_regions() -> list[Region]:
    """The 14 coarse Allen CCFv3 divisions used by the shipped model."""
    return [Region(i, name, acr, color, desc, tuple(allen_prompts(name, acr, parent, desc)))
            for i, acr, name, color, parent, desc in _ALLEN]


def allen_prompts(name: str, acronym: str, parent: str, description: str) -> list[str]:
    return [f"a Nissl-stained section of the {name}", f"{name} ({acronym}), part of the {parent}",
            f"{name}: {description}"]


def training_captions(region: Region) -> list[str]:
    """Varied captions for one region (the prompts plus further phrasings)."""
    extra = [f"Nissl histology of the mouse {region.name}", f"{region.acronym} region, cresyl violet stain",
             f"a tile from the {region.name} of an adult mouse brain", region.description]
    return list(dict.fromkeys([*region.texts(), *[e for e in extra if e]]))


def fetal_human_regions(kind: str = "tissue") -> list[Region]:
    """The 21 PCW fetal vocabulary (tissue zones or cortical regions) from the packaged LUT."""
    if kind not in ("tissue", "cortical_region"):
        raise ValueError("kind is 'tissue' or 'cortical_region'")
    with open(DATA_DIR / "fetal_human_21pcw_structure_lut.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r[kind] for r in rows if r[kind] not in ("???", "NO_LABEL", "brain_tissue")})
    palette = _palette(len(names))
    regions = []
    for i, name in enumerate(names, start=1):
        members = sorted({r["structure_name"] for r in rows if r[kind] == name})[:3]
        label = name.replace("_", " ")
        desc = "fetal " + label + (" (e.g. " + "; ".join(members) + ")" if members else "")
        regions.append(Region(i, label, name, palette[i - 1], desc,
                              (f"a Nissl-stained section of the fetal {label}", desc)))
    return regions


def _palette(n: int) -> list[str]:

    return ["#%02x%02x%02x" % tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / max(n, 1), 0.55, 0.95))
            for i in range(n)]


def auto_color(existing: Sequence[str], seed: int) -> str:
    """A saturated colour far (in hue) from the ``existing`` ones."""
    used = []
    for c in existing:
        h = c.lstrip("#")
        r, g, b = (int(h[i:i + 2], 16) / 255 for i in (0, 2, 4))
        used.append(colorsys.rgb_to_hsv(r, g, b)[0])
    candidates = [(seed * 0.618034 + k / 64) % 1.0 for k in range(64)]
    def distance(hue):
        return min((min(abs(hue - u), 1 - abs(hue - u)) for u in used), default=1.0)
    hue = max(candidates, key=distance)
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return "#%02x%02x%02x" % (int(r * 255), int(g * 255), int(b * 255))


def acronym_of(name: str) -> str:
    """A short acronym for a region name: its initials, or the first letters of one word."""
    words = [w for w in name.replace("-", " ").split() if w]
    if len(words) == 1:
        return words[0][:6]
    return "".join(w[0].upper() for w in words)[:6]
