"""The toy world and the toy CLIP: a world whose every factor and mask is known (`world`), a
tiny CLIP trained on it (`model`, `train`), the paper's claims checked against that ground
truth (`study`) and the demo's report (`report`). Only the command line and the package's
front (which registers the embedded models for `textspan.load`) import this tier."""

from . import world
from .model import SPURIOUS_DIR, TOY_DIR, ToyConfig, load_toy, toy_meta

__all__ = ["SPURIOUS_DIR", "TOY_DIR", "ToyConfig", "load_toy", "toy_meta", "world"]
