"""Learning from corrections: pairs and exports, deep fine-tuning, evaluation, and live teaching sets.

The fast learner itself is a model part (:mod:`napari_cytoclip.models.learner`, :mod:`~napari_cytoclip.models.taught`);
:mod:`.teaching` collects taught cells and fits it; :mod:`.features` holds the research feature extractors.
"""
