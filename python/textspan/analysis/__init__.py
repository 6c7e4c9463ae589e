"""The analyses on contributions (NumPy; a `Store` or in-memory `Contributions`): the paper's
mean-ablation, replacement, spurious-feature repair and retrieval, and zero-shot segmentation
from a model's patch contributions."""

from .ablation import AblationResult, ablation
from .repair import (
    GroupAccuracy,
    RepairResult,
    group_accuracy,
    rank_heads,
    repair,
    repair_head_count,
)
from .replacement import ReplacementResult, replacement
from .retrieval import Retrieval, retrieve
from .segmentation import Segmentation, segment
from .sources import Contributions, Head, TermMeans, term_means

__all__ = [
    "AblationResult",
    "Contributions",
    "GroupAccuracy",
    "Head",
    "RepairResult",
    "ReplacementResult",
    "Retrieval",
    "Segmentation",
    "TermMeans",
    "ablation",
    "group_accuracy",
    "rank_heads",
    "repair",
    "repair_head_count",
    "replacement",
    "retrieve",
    "segment",
    "term_means",
]
