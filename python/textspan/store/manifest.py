"""What a store holds and how it was made: the typed, frozen `Manifest` (manifest.json), and
the kinds of rows a store holds (`ROW_KINDS`).

A kind of row is a declaration: a name, the shape of one image's row as a function of the
manifest, and whether it is stored in the store's dtype or as integers. The writer
preallocates, fills, checksums and merges every declared kind alike, and the reader opens
them, so a new kind of row (the neurons' coefficients next) is one line here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.checks import CONVENTIONS, Convention
from ..errors import StoreError
from .format import read_json

__all__ = ["ROW_KINDS", "STORE_VERSION", "Manifest", "RowKind"]

# The version of the store's format. A store of another version is refused with both named:
# other versions hold other arrays.
STORE_VERSION = 2


@dataclass(frozen=True)
class RowKind:
    """One array of a store: a row per readable image.

    `shape(manifest)` is one row's shape; `dtype` None means the store's dtype (float16 or
    float32), else this fixed one. `decomposed` kinds come from the decomposition (the
    engines hand them to the writer); the others the writer fills itself from the manifest."""

    name: str
    shape: Callable[[Manifest], tuple[int, ...]]
    dtype: str | None = None
    decomposed: bool = True


ROW_KINDS: tuple[RowKind, ...] = (
    RowKind("heads", lambda m: (m.layers, m.heads, m.dim)),
    RowKind("mlps", lambda m: (len(m.terms), m.dim)),
    RowKind("class_token", lambda m: (m.layers, m.dim)),
    RowKind("representation", lambda m: (m.dim,)),
    RowKind("labels", lambda m: (), "int64", decomposed=False),
)

# Arguments a resumed store must share with the run resuming it.
_ARGUMENTS = ("model", "pretrained", "precision", "dtype", "convention", "layers", "heads", "dim")


def _typed(path: Path, data: Mapping[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    value = data.get(key, default)
    if value is ... or not isinstance(value, kind) or isinstance(value, bool):
        raise StoreError(
            f"store {path}: manifest.json is corrupt: expected {key!r} to be a "
            f"{kind.__name__}, got {data.get(key)!r:.60}"
        )
    return value


@dataclass(frozen=True)
class Manifest:
    """What identifies a store: the model, the images (names, labels, classes, and each
    file's [size, modification time]), the rows' shape and the decomposition's convention.

    `dataset` names the images' reader (`textspan.datasets`); `attributes` are its per-image
    integers (Waterbirds' place and group); `terms` name the `mlps` entries."""

    model: str
    pretrained: str | None
    precision: str
    dtype: str
    convention: Convention
    images: str
    layers: int
    heads: int
    dim: int
    terms: tuple[str, ...]
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    stamps: tuple[tuple[int, ...], ...] | None = None
    dataset: str = "folder"
    attributes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    version: int = STORE_VERSION

    @property
    def count(self) -> int:
        """The number of image files listed (a row is written for each readable one)."""
        return len(self.files)

    @property
    def head_shape(self) -> tuple[int, int, int]:
        """(layers, heads per layer, D)."""
        return self.layers, self.heads, self.dim

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every declared array's full shape [count, *row] and dtype."""
        return {k.name: ((self.count, *k.shape(self)), k.dtype or self.dtype) for k in ROW_KINDS}

    def row_shape(self, name: str) -> tuple[int, ...]:
        return next(k.shape(self) for k in ROW_KINDS if k.name == name)

    def moved_to(self, images: str) -> Manifest:
        """The same store, its images now read from `images` (a moved folder resumes)."""
        return replace(self, images=images)

    # manifest.json --------------------------------------------------------------------------

    def to_json(self) -> bytes:
        data = asdict(self)
        data["count"] = self.count  # for readers of the file itself
        data["attributes"] = {k: list(v) for k, v in self.attributes.items()}
        return json.dumps(data, indent=1).encode()

    @classmethod
    def from_json(cls, path: Path, data: Any) -> Manifest:
        """The manifest of the store at `path` from its parsed manifest.json; a store of
        another version, or a corrupt file, is a StoreError saying which."""
        if not isinstance(data, dict):
            raise StoreError(f"manifest.json is corrupt ({path}): expected a JSON object")
        if data.get("version") != STORE_VERSION:
            raise StoreError(
                f"store {path}: version {data.get('version')!r}, expected {STORE_VERSION} "
                "(stores of other versions hold other arrays: extract the images again)"
            )
        files = _typed(path, data, "files", list)
        count = _typed(path, data, "count", int, len(files))
        if len(files) != count:
            raise StoreError(
                f"store {path}: manifest.json is corrupt: {len(files)} files for a count of {count}"
            )
        layers = _typed(path, data, "layers", int)
        classes = _typed(path, data, "classes", list)
        convention = data.get("convention", "textspan")  # older stores: textspan's
        if convention not in CONVENTIONS:
            raise StoreError(f"store {path}: manifest.json names convention {convention!r}")
        labels = data.get("labels")
        if labels is None:  # older stores: the class folder's index, or -1 in a flat set
            index = {name: i for i, name in enumerate(classes)}
            labels = [index.get(Path(f).parts[0], -1) if index else -1 for f in files]
        stamps = data.get("stamps")
        return cls(
            model=_typed(path, data, "model", str),
            pretrained=data.get("pretrained"),
            precision=_typed(path, data, "precision", str),
            dtype=_typed(path, data, "dtype", str),
            convention=convention,
            images=_typed(path, data, "images", str),
            layers=layers,
            heads=_typed(path, data, "heads", int),
            dim=_typed(path, data, "dim", int),
            # Older stores: the embedding and each layer's MLP.
            terms=tuple(
                data.get("terms") or ["embedding", *(f"layer {i} MLP" for i in range(layers))]
            ),
            classes=tuple(classes),
            files=tuple(files),
            labels=tuple(int(v) for v in labels),
            stamps=None if stamps is None else tuple(tuple(s) for s in stamps),
            dataset=data.get("dataset", "folder"),
            attributes={k: tuple(v) for k, v in data.get("attributes", {}).items()},
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_json(
            path, read_json(path / "manifest.json", f"store {path}: manifest.json")
        )

    # Resuming -------------------------------------------------------------------------------

    def check_resume(self, new: Manifest, passed: Sequence[str], out: Path) -> None:
        """Refuses to resume this store with the run that would write `new`: other
        arguments, or other images.

        The images are compared by what identifies them — relative names, classes, sizes
        and modification times — not by the folder's path, so a moved folder resumes. Files
        the store already `passed` (skipped as unreadable, or stopped at by --strict) may
        since have been removed."""
        differing = [k for k in _ARGUMENTS if getattr(self, k) != getattr(new, k)]
        if differing:
            shown = ", ".join(
                f"{k}: {getattr(self, k)!r} there, {getattr(new, k)!r} now" for k in differing
            )
            raise StoreError(
                f"{out} already holds a store made with other arguments ({shown}). "
                "Use another output folder, or rerun with the same arguments to resume."
            )
        now = dict(zip(new.files, new.stamps or [None] * new.count, strict=True))
        before = dict(zip(self.files, self.stamps or [None] * self.count, strict=True))
        added = [f for f in now if f not in before]
        removed = [f for f in before if f not in now and f not in passed]
        changed = [f for f, stamp in before.items() if f in now and stamp not in (None, now[f])]
        problems = [
            f"{len(fs)} {what} (e.g. {', '.join(fs[:3])})"
            for what, fs in (("added", added), ("removed", removed), ("changed", changed))
            if fs
        ]
        if self.classes != new.classes and not problems:
            problems.append(f"the classes differ ({list(self.classes[:3])} … there)")
        if not problems:
            before_labels = dict(zip(self.files, self.labels, strict=True))
            relabelled = [
                f
                for f, label in zip(new.files, new.labels, strict=True)
                if before_labels.get(f, label) != label
            ]
            if relabelled:
                problems.append(
                    f"{len(relabelled)} relabelled (e.g. {relabelled[0]}: another label file?)"
                )
        if not problems:
            problems += _changed_attributes(self, new)
        if problems:
            raise StoreError(
                f"{out} holds a store begun on other images: since then, images were "
                + "; ".join(problems)
                + ". Use another output folder, or restore the images to resume."
            )


def _changed_attributes(old: Manifest, new: Manifest) -> list[str]:
    """The first per-image field of the reader (Waterbirds' place and group) that differs,
    for the images both listings hold, as a problem to name; none: []."""
    for key in sorted(set(old.attributes) | set(new.attributes)):
        before = dict(zip(old.files, old.attributes.get(key) or [None] * old.count, strict=True))
        now = dict(zip(new.files, new.attributes.get(key) or [None] * new.count, strict=True))
        changed = [f for f in now if f in before and before[f] != now[f]]
        if changed:
            return [
                f"given another {key!r} ({len(changed)}, e.g. {changed[0]}: another metadata file?)"
            ]
    return []
