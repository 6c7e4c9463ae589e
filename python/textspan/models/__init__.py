"""The model tier (PyTorch): loading, text encoding, zero-shot classifiers, and the exact
decomposition of an image tower into direct contributions — the maths once
(`decompose.py`), one adapter per tower family (`openclip.py`), chosen in `families.py`."""

from .decompose import Decomposer, Decomposition
from .families import CatalogueEntry, IdentityCheck, catalogue, check_identity, tower_of
from .loading import default_device, load, register_model, resolve_model_name, skeleton
from .texts import encode_texts, imagenet_names, imagenet_synsets, zero_shot_classifier
from .tower import LayerMaps, Tower, term_names

__all__ = [
    "CatalogueEntry",
    "Decomposer",
    "Decomposition",
    "IdentityCheck",
    "LayerMaps",
    "Tower",
    "catalogue",
    "check_identity",
    "default_device",
    "encode_texts",
    "imagenet_names",
    "imagenet_synsets",
    "load",
    "register_model",
    "resolve_model_name",
    "skeleton",
    "term_names",
    "tower_of",
    "zero_shot_classifier",
]
