"""textspan: what each part of a CLIP vision transformer writes into its image embedding, in words.

Implements and extends Gandelsman, Efros and Steinhardt, "Interpreting CLIP's Image
Representation via Text-Based Decomposition" (ICLR 2024).

    >>> import numpy as np, textspan
    >>> outputs = np.random.default_rng(0).standard_normal((500, 64))   # one head, 500 images
    >>> pool = np.random.default_rng(1).standard_normal((300, 64))      # 300 text embeddings
    >>> result = textspan.text_span(outputs, pool, n_texts=5, rank=32)
    >>> len(result.indices)
    5
"""

from ._core import get_num_threads, set_num_threads
from .decompose import Decomposer, Decomposition, UnsupportedModelError
from .models import encode_texts, load, zero_shot_classifier
from .span import (
    HeadStats,
    SpanResult,
    TextPool,
    text_span,
    text_span_from_stats,
    text_span_heads,
)
from .store import Store, StoreError, extract, open_store

__version__ = "0.1.0"

__all__ = [
    "Decomposer",
    "Decomposition",
    "HeadStats",
    "SpanResult",
    "Store",
    "StoreError",
    "TextPool",
    "UnsupportedModelError",
    "__version__",
    "encode_texts",
    "extract",
    "get_num_threads",
    "load",
    "open_store",
    "set_num_threads",
    "text_span",
    "text_span_from_stats",
    "text_span_heads",
    "zero_shot_classifier",
]
