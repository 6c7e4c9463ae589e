"""The store tier: the on-disk format of contributions and statistics (`format`), the image
sources read into it (`images`), and the statistics as they accumulate (`sums`). The engines
(`textspan.engines`) write stores; everything above reads them with `open_store`."""

from .format import Store, open_store
from .images import IMAGE_SUFFIXES, ImageDataset, list_images
from .sums import DeviceStats, stats_from_sums

__all__ = [
    "IMAGE_SUFFIXES",
    "DeviceStats",
    "ImageDataset",
    "Store",
    "list_images",
    "open_store",
    "stats_from_sums",
]
