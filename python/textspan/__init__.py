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
from .span import (
    HeadStats,
    SpanResult,
    TextPool,
    text_span,
    text_span_from_stats,
    text_span_heads,
)

__version__ = "0.1.0"

__all__ = [
    "Decomposer",
    "Decomposition",
    "HeadStats",
    "SpanResult",
    "TextPool",
    "UnsupportedModelError",
    "__version__",
    "get_num_threads",
    "set_num_threads",
    "text_span",
    "text_span_from_stats",
    "text_span_heads",
]
