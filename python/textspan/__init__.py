"""textspan: what each part of a CLIP vision transformer writes into its image embedding, in words.

Implements and extends Gandelsman, Efros and Steinhardt, "Interpreting CLIP's Image
Representation via Text-Based Decomposition" (ICLR 2024).

    >>> import numpy as np, textspan
    >>> outputs = np.random.default_rng(0).standard_normal((500, 64))   # one head, 500 images
    >>> pool = np.random.default_rng(1).standard_normal((300, 64))      # 300 text embeddings
    >>> result = textspan.text_span(outputs, pool, n_texts=5, rank=32)
    >>> len(result.indices)
    5

The package is built in tiers, each importing only those below it: `core` (NumPy and the Rust
extension: TextSpan, statistics, metrics, text pools) → `models` (PyTorch: loading, texts,
the decomposition) → `store` (the on-disk format) → `engines` (local and Ray extraction) →
`analysis` → `report` → `explorer` → `toy` → `experiments` → `cli`. This front re-exports
the public API; TextSpan, the analyses on stores and the segmentation metrics need only
NumPy, and the model side (`pip install 'textspan[torch]'`) is imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from .analysis.ablation import ablation
from .analysis.repair import rank_heads, repair, repair_head_count
from .analysis.replacement import replacement
from .analysis.retrieval import retrieve
from .analysis.sources import Contributions, term_means
from .core import (
    HeadStats,
    SpanResult,
    TextPool,
    class_heatmaps,
    common_words,
    default_pool,
    get_num_threads,
    load_texts,
    normalised_heatmaps,
    segmentation_scores,
    set_num_threads,
    text_span,
    text_span_from_stats,
    text_span_heads,
)
from .errors import (
    AnalysisWarning,
    DataWarning,
    FewerTextsWarning,
    InputError,
    InputTypeError,
    MissingDependencyError,
    MissingFileError,
    NumericalError,
    RoundingWarning,
    SettingWarning,
    SkippedImagesWarning,
    StoreError,
    TextspanError,
    TextspanWarning,
    UnreadableImageError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from . import experiments
    from .analysis.segmentation import segment
    from .engines import LocalEngine, RayEngine, encode_texts, extract
    from .models import Decomposer, Decomposition, load, zero_shot_classifier
    from .store import Manifest, Store, StoreReader, open_store
    from .toy import world as toyworld

# Written once, in Cargo.toml (the wheel's metadata carries it).
__version__ = importlib.metadata.version(__name__)

# Names whose modules import PyTorch (or the toy tier): loaded on first access.
_LAZY = {
    "Decomposer": ("models", "Decomposer"),
    "Decomposition": ("models", "Decomposition"),
    "load": ("models", "load"),
    "zero_shot_classifier": ("models", "zero_shot_classifier"),
    "encode_texts": ("engines", "encode_texts"),
    "extract": ("engines", "extract"),
    "LocalEngine": ("engines", "LocalEngine"),
    "RayEngine": ("engines", "RayEngine"),
    "Manifest": ("store", "Manifest"),
    "Store": ("store", "Store"),
    "StoreReader": ("store", "StoreReader"),
    "open_store": ("store", "open_store"),
    "segment": ("analysis.segmentation", "segment"),
    "experiments": ("experiments", None),
    "toyworld": ("toy.world", None),
}
_TORCH_SIDE = ("torch", "torchvision", "open_clip", "PIL", "matplotlib")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'textspan' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    try:
        module = importlib.import_module(f".{module_name}", __name__)
    except ModuleNotFoundError as e:
        if e.name in _TORCH_SIDE:
            raise MissingDependencyError(
                f"textspan.{name} needs PyTorch and open_clip ({e.name} is missing): "
                "pip install 'textspan[torch]'"
            ) from e
        raise
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AnalysisWarning",
    "Contributions",
    "DataWarning",
    "Decomposer",
    "Decomposition",
    "FewerTextsWarning",
    "HeadStats",
    "InputError",
    "InputTypeError",
    "LocalEngine",
    "Manifest",
    "MissingDependencyError",
    "MissingFileError",
    "NumericalError",
    "RayEngine",
    "RoundingWarning",
    "SettingWarning",
    "SkippedImagesWarning",
    "SpanResult",
    "Store",
    "StoreError",
    "StoreReader",
    "TextPool",
    "TextspanError",
    "TextspanWarning",
    "UnreadableImageError",
    "UnsupportedModelError",
    "__version__",
    "ablation",
    "class_heatmaps",
    "common_words",
    "default_pool",
    "encode_texts",
    "experiments",
    "extract",
    "get_num_threads",
    "load",
    "load_texts",
    "normalised_heatmaps",
    "open_store",
    "rank_heads",
    "repair",
    "repair_head_count",
    "replacement",
    "retrieve",
    "segment",
    "segmentation_scores",
    "set_num_threads",
    "term_means",
    "text_span",
    "text_span_from_stats",
    "text_span_heads",
    "toyworld",
    "zero_shot_classifier",
]
