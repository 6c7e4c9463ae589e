"""The store tier: the on-disk store of contributions and statistics. `manifest` says what a
store holds (the typed `Manifest`, and the kinds of rows, `ROW_KINDS`), `writer` is its one
writer (`StoreWriter`, and `PartWriter` for rows written elsewhere), `reader` its one reader
(`open_store` → `StoreReader`), `format` the files' helpers; `images` lists and reads the
images, `sums` accumulates the statistics. The engines (`textspan.engines`) hand rows to a
writer; everything above reads stores with `open_store`."""

from .images import IMAGE_SUFFIXES, ImageDataset, list_images
from .manifest import ROW_KINDS, Manifest, RowKind
from .reader import Store, StoreReader, open_store
from .sums import DeviceStats, stats_from_sums
from .writer import PartWriter, StoreWriter

__all__ = [
    "IMAGE_SUFFIXES",
    "ROW_KINDS",
    "DeviceStats",
    "ImageDataset",
    "Manifest",
    "PartWriter",
    "RowKind",
    "Store",
    "StoreReader",
    "StoreWriter",
    "list_images",
    "open_store",
    "stats_from_sums",
]
