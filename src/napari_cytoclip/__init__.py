"""napari-cytoclip: CytoCLIP region prediction, correction and text query for Nissl sections.

The compute core (no Qt) lives in the modules ``sections``, ``tissue``, ``grid``, ``windows``,
``bundle``, ``model``, ``predict``, ``aggregate``, ``pairs``, ``train`` and friends; the napari
widgets in ``widgets`` are thin layers over it.
"""
__version__ = "0.1.0"
