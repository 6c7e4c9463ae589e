"""What the toy study (`study`) finds: plain records, read by its report and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import analysis
from ..analysis import Head
from ..core.checks import Convention
from . import world as tw

__all__ = [
    "HeadFactor",
    "RetrievalCheck",
    "SegmentationCheck",
    "SpuriousCheck",
    "StudyResult",
]


@dataclass
class HeadFactor:
    """A head, the factor its top TextSpan texts are most about, and how much.

    `purity` weights each top text by the share of the head's variance it explains;
    `text_share` counts them. The count understates heads of factors with few values: a
    centred four-valued factor spans three directions, so after three texts a position
    head's variance is spent and its fourth and fifth texts are noise."""

    head: Head
    factor: str
    purity: float
    text_share: float
    texts: list[str]
    explained: float  # share of the head's variance its top texts explain
    stable: int | None = None  # TextSpan picks that survive rounding (SpanResult.stable)


@dataclass
class SegmentationCheck:
    scores: dict[str, float]  # pixel_accuracy, miou, map against the exact masks
    segmentation: analysis.Segmentation


@dataclass
class SpuriousCheck:
    ranked: list[tuple[Head, float]]
    result: analysis.RepairResult
    classes: tuple[str, str]
    backgrounds: tuple[str, str]
    validation: dict[int, float]  # worst-group accuracy on validation groups per head count
    trained: dict = field(default_factory=dict)  # the model's toy.json, when known


@dataclass
class RetrievalCheck:
    """Per factor, the share of neighbours that have the query's value of it."""

    head: Head
    factor: str
    by_head: dict[str, float]
    by_all: dict[str, float]
    chance: dict[str, float]
    example: analysis.Retrieval  # the first query's neighbours by the head


@dataclass
class StudyResult:
    """What `study` found, for the demo's printout and its report."""

    zero_shot: dict[str, float]  # held-out accuracy per factor
    identity_error: float  # largest relative error of the sum of the parts
    heads: list[HeadFactor]
    chance_purity: float
    ablation: dict[str, analysis.AblationResult]  # per factor
    segmentation: dict[str, SegmentationCheck]  # per method
    spurious: SpuriousCheck  # on the model trained to lean on the background
    spurious_on_this_model: analysis.GroupAccuracy
    retrieval: list[RetrievalCheck]
    world: tw.World
    held_out: tw.World
    timings: dict[str, float]
    report: Path | None = None
    convention: Convention = "textspan"

    def unstable_heads(self, top: int = 5) -> int:
        """Heads whose first `top` TextSpan texts include picks rounding decided."""
        return sum(1 for h in self.heads if h.stable is not None and h.stable < top)
