"""textspan: what each part of a CLIP vision transformer writes into its image embedding, in words.

Implements and extends Gandelsman, Efros and Steinhardt, "Interpreting CLIP's Image
Representation via Text-Based Decomposition" (ICLR 2024).

    >>> import numpy as np, textspan
    >>> outputs = np.random.default_rng(0).standard_normal((500, 64))   # one head, 500 images
    >>> pool = np.random.default_rng(1).standard_normal((300, 64))      # 300 text embeddings
    >>> result = textspan.text_span(outputs, pool, n_texts=5, rank=32)
    >>> len(result.indices)
    5

TextSpan, the analyses on stores (`ablation`, `replacement`, `repair`, `retrieve`) and the
segmentation metrics need only NumPy. The model side (`Decomposer`, `load`, `encode_texts`,
`zero_shot_classifier`, `extract`, `open_store`) needs PyTorch and open_clip
(`pip install 'textspan[torch]'`) and is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import experiments, toyworld
from ._core import get_num_threads, set_num_threads
from .analysis import (
    Contributions,
    ablation,
    rank_heads,
    repair,
    repair_head_count,
    replacement,
    retrieve,
    term_means,
)
from .heatmaps import (
    class_heatmaps,
    normalised_heatmaps,
    segment,
    segmentation_scores,
)
from .pools import common_words, default_pool, load_texts
from .span import (
    HeadStats,
    SpanResult,
    TextPool,
    text_span,
    text_span_from_stats,
    text_span_heads,
)

if TYPE_CHECKING:
    from .decompose import Decomposer, Decomposition, UnsupportedModelError
    from .models import encode_texts, load, zero_shot_classifier
    from .store import Store, StoreError, extract, open_store

__version__ = "0.1.0"

# Names whose modules import PyTorch: loaded on first access.
_TORCH_SIDE = {
    "Decomposer": "decompose",
    "Decomposition": "decompose",
    "UnsupportedModelError": "decompose",
    "encode_texts": "models",
    "load": "models",
    "zero_shot_classifier": "models",
    "Store": "store",
    "StoreError": "store",
    "extract": "store",
    "open_store": "store",
}


def __getattr__(name: str) -> Any:
    if name not in _TORCH_SIDE:
        raise AttributeError(f"module 'textspan' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_TORCH_SIDE[name]}", __name__)
    except ModuleNotFoundError as e:
        if e.name in ("torch", "torchvision", "open_clip", "PIL"):
            raise ImportError(
                f"textspan.{name} needs PyTorch and open_clip ({e.name} is missing): "
                "pip install 'textspan[torch]'"
            ) from e
        raise
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Contributions",
    "Decomposer",
    "Decomposition",
    "HeadStats",
    "SpanResult",
    "Store",
    "StoreError",
    "TextPool",
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
