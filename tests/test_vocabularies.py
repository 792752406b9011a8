"""The free-text check queries really are new words to the shipped model."""
from napari_cytoclip.models.bundle import default_bundle_path, load_bundle
from napari_cytoclip.models.vocabularies import (ALLEN_PARAPHRASES, allen_mouse_regions, content_stems,
                                                 training_captions, word_stem)


def _training_stems() -> set[str]:
    stems = set()
    regions = allen_mouse_regions() + load_bundle(default_bundle_path()).regions
    for region in regions:
        for caption in [*training_captions(region), *region.texts(), region.name, region.acronym]:
            stems |= content_stems(caption)
    return stems


def test_paraphrases_share_no_content_word_with_training_captions():
    seen = _training_stems()
    shared = {text: sorted(content_stems(text) & seen)
              for texts in ALLEN_PARAPHRASES.values() for text in texts if content_stems(text) & seen}
    assert not shared, f"paraphrases reuse training words: {shared}"


def test_every_region_has_paraphrases():
    assert sorted(ALLEN_PARAPHRASES) == [r.id for r in allen_mouse_regions()]
    assert all(len(v) >= 2 for v in ALLEN_PARAPHRASES.values())


def test_stems_catch_variants():
    assert word_stem("Neocortical") == word_stem("neocortex")
    assert word_stem("areas") == word_stem("area")
    assert content_stems("the olfactory bulb") == {"olfac", "bulb"}
