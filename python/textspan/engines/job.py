"""What an extraction is asked to do, whichever engine does it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.checks import Convention
from ..datasets import ImageSet, manifest_of
from ..models import term_names
from ..store.manifest import Manifest

__all__ = ["ExtractJob"]


@dataclass(frozen=True)
class ExtractJob:
    """The options of `textspan.extract` that do not depend on the engine (checked there)."""

    model: str
    pretrained: str | None
    precision: str
    dtype: str
    convention: Convention
    batch_size: int
    strict: bool
    progress: bool
    on_progress: Callable[[int], None] | None

    def manifest(self, source: ImageSet, tower: Any) -> Manifest:
        """The manifest of the store of `source` decomposed by a model with this `tower`."""
        return manifest_of(
            source,
            model=self.model,
            pretrained=self.pretrained,
            precision=self.precision,
            dtype=self.dtype,
            shape=(tower.layers, tower.heads, tower.dim, term_names(tower)),
            convention=self.convention,
        )

    def report(self, files_done: int) -> None:
        if self.on_progress is not None:
            self.on_progress(files_done)
