"""The NumPy tier: TextSpan, head statistics, segmentation metrics and text pools, over the
Rust extension `textspan._core`. Nothing here imports PyTorch or anything above it."""

from .metrics import class_heatmaps, foreground, normalised_heatmaps, segmentation_scores
from .pools import common_words, default_pool, load_texts
from .span import SpanResult, TextPool, text_span, text_span_from_stats, text_span_heads
from .stats import HeadStats
from .threads import apply_environment, get_num_threads, set_num_threads

apply_environment()

__all__ = [
    "HeadStats",
    "SpanResult",
    "TextPool",
    "class_heatmaps",
    "common_words",
    "default_pool",
    "foreground",
    "get_num_threads",
    "load_texts",
    "normalised_heatmaps",
    "segmentation_scores",
    "set_num_threads",
    "text_span",
    "text_span_from_stats",
    "text_span_heads",
]
