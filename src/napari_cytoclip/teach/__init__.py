"""Live teaching: a fast head on cached per-cell features, around the text classifier (issue 13).

``learner``: :class:`~.learner.Learner`, :func:`~.learner.prior_logits`, :func:`~.learner.smooth` (numpy/torch).
``features``: the image tower's pooled features and an optional high-resolution ImageNet view (needs the model).
"""
from .learner import Learner, prior_logits, smooth

__all__ = ["Learner", "prior_logits", "smooth"]
