"""The model tier (PyTorch): loading, text encoding, zero-shot classifiers, and the exact
decomposition of an image tower into direct contributions — the maths once
(`decompose.py`), one adapter per tower family (`openclip.py`, `timm.py`, `hf.py`), the
families registered and recognised in one place (`families.py`)."""

from .catalogue import CatalogueEntry, IdentityCheck, catalogue, check_identity
from .decompose import Decomposer, Decomposition
from .families import FAMILIES, TowerFamily, family_of, register_tower, tower_of
from .loading import default_device, load, register_model, resolve_model_name, skeleton
from .texts import encode_texts, imagenet_names, imagenet_synsets, zero_shot_classifier
from .tower import LayerMaps, Tower, term_names

__all__ = [
    "FAMILIES",
    "CatalogueEntry",
    "Decomposer",
    "Decomposition",
    "IdentityCheck",
    "LayerMaps",
    "Tower",
    "TowerFamily",
    "catalogue",
    "check_identity",
    "default_device",
    "encode_texts",
    "family_of",
    "imagenet_names",
    "imagenet_synsets",
    "load",
    "register_model",
    "register_tower",
    "resolve_model_name",
    "skeleton",
    "term_names",
    "tower_of",
    "zero_shot_classifier",
]
