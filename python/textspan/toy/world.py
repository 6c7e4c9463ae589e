"""A toy world with ground truth: small images of one or two objects whose shape, colour,
size and position, and whose background, are drawn from known sets; every image comes with
its factors, a caption in words and exact per-pixel object masks.

    world = textspan.toyworld.generate(1000, seed=0)
    world.images    # [N, S, S, 3] uint8
    world.masks     # [N, S, S] bool, the union of the objects
    world.factors   # {"shape": [N, K], "colour": [N, K], "size": [N, K], "position": [N, K],
                    #  "background": [N]} indices into SHAPES, COLOURS, … (K objects)
    world.captions  # ["a small red triangle at the top left on a water background", …]

`Correlation` makes two factors co-occur in training (e.g. circles mostly on grass and
triangles mostly on water), like Waterbirds; `balanced_groups` draws test sets in which
every combination of the pair is equally frequent. Everything is drawn from one seeded
NumPy generator, so a seed gives the same world on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "FACTORS",
    "NAMES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Correlation",
    "World",
    "balanced_groups",
    "caption",
    "factor_captions",
    "generate",
]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 55, 185),
}
SIZES = {"small": 0.12, "large": 0.2}  # half-extent as a fraction of the side: within a quadrant
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {  # base colour, and the stripe colour of a textured background (or None)
    "gray": ((128, 128, 128), None),
    "white": ((235, 235, 235), None),
    "water": ((70, 120, 175), (95, 150, 205)),
    "grass": ((75, 140, 55), (60, 115, 40)),
}
FACTORS = ("shape", "colour", "size", "position", "background")
NAMES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class Correlation:
    """Factor `second` follows factor `first` of the first object: with probability
    `strength`, `second` takes `pairs[first's value]` (names); otherwise it is drawn
    uniformly. Values of `first` not in `pairs` leave `second` uniform."""

    first: str
    second: str
    pairs: dict[str, str]
    strength: float = 0.9

    def __post_init__(self) -> None:
        for name in (self.first, self.second):
            if name not in FACTORS:
                raise InputError(f"correlation: expected factors among {FACTORS}, got {name!r}")
        if self.first == self.second:
            raise InputError("correlation: expected two different factors")
        for a, b in self.pairs.items():
            if a not in NAMES[self.first] or b not in NAMES[self.second]:
                raise InputError(
                    f"correlation: {a!r} → {b!r} is not a {self.first} → {self.second} pair"
                )
        if not 0.0 <= self.strength <= 1.0:
            raise InputError(f"correlation: expected a strength in [0, 1], got {self.strength}")


@dataclass
class World:
    """Images with their ground truth (see the module docstring)."""

    images: np.ndarray
    masks: np.ndarray
    object_masks: np.ndarray  # [N, K, S, S]: each object's own pixels
    factors: dict[str, np.ndarray]
    captions: list[str]
    full_captions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def values(self, factor: str) -> np.ndarray:
        """[N] the factor's value index per image (first object for object factors)."""
        values = self.factors[factor]
        return values if values.ndim == 1 else values[:, 0]

    def names(self, factor: str) -> np.ndarray:
        """The factor's value names per image (first object for object factors)."""
        return np.array(NAMES[factor])[self.values(factor)]


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * r
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= 0.8 * r) & (np.abs(dx) <= 0.58 * (dy + r))
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise InputError(f"shape: expected one of {SHAPES}, got {shape!r}")


def caption(values: dict[str, int | list[int]], named: set[str] | None = None) -> str:
    """The caption of an image from its factor indices, naming the factors in `named`
    (default all). Unnamed shapes become "object"; two objects are joined by "and"."""
    named = set(FACTORS) if named is None else named
    shapes = np.atleast_1d(values["shape"])
    parts = []
    for k in range(len(shapes)):
        words = []
        if "size" in named:
            words.append(tuple(SIZES)[np.atleast_1d(values["size"])[k]])
        if "colour" in named:
            words.append(tuple(COLOURS)[np.atleast_1d(values["colour"])[k]])
        words.append(SHAPES[shapes[k]] if "shape" in named else "object")
        phrase = " ".join(words)
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
        if "position" in named:
            phrase += f" at the {POSITIONS[np.atleast_1d(values['position'])[k]]}"
        parts.append(phrase)
    text = " and ".join(parts)
    if "background" in named:
        text += f" on a {tuple(BACKGROUNDS)[int(values['background'])]} background"
    return text


def factor_captions(factor: str) -> list[str]:
    """The captions naming only `factor`, one per value in value order ("a red object",
    "a green object", …): the zero-shot classes of that factor."""
    return [
        caption(dict.fromkeys(FACTORS, 0) | {factor: value}, {factor})
        for value in range(len(NAMES[factor]))
    ]


def _draw(
    rng: np.random.Generator, n: int, objects: int, correlation: Correlation | None
) -> dict[str, np.ndarray]:
    f = {
        "shape": rng.integers(0, len(SHAPES), (n, objects)),
        "colour": rng.integers(0, len(COLOURS), (n, objects)),
        "size": rng.integers(0, len(SIZES), (n, objects)),
        # Objects of one image sit in different quadrants.
        "position": np.stack([rng.permutation(len(POSITIONS))[:objects] for _ in range(n)]),
        "background": rng.integers(0, len(BACKGROUNDS), n),
    }
    if correlation is not None:
        first = f[correlation.first]
        first = first if first.ndim == 1 else first[:, 0]
        follow = rng.random(n) < correlation.strength
        for a, b in correlation.pairs.items():
            rows = follow & (first == NAMES[correlation.first].index(a))
            target = f[correlation.second]
            value = NAMES[correlation.second].index(b)
            if target.ndim == 1:
                target[rows] = value
            else:
                target[rows, 0] = value
    return f


def generate(
    n: int,
    seed: int = 0,
    *,
    size: int = 32,
    objects: int = 1,
    correlation: Correlation | None = None,
    caption_factors: float = 0.5,
) -> World:
    """A world of `n` images of `size`×`size` pixels with `objects` (1 or 2) objects each.

    Each caption names every factor with probability `caption_factors` (at least one), as in
    "a red object" or "a small circle on a gray background"; `full_captions` name them all.
    """
    if n < 1 or size < 8 or objects not in (1, 2):
        raise InputError(
            f"n >= 1, size >= 8 and 1 or 2 objects expected, got {n}, {size}, {objects}"
        )
    rng = np.random.default_rng(seed)
    f = _draw(rng, n, objects, correlation)
    centre = np.arange(size) + 0.5
    yy, xx = np.meshgrid(centre, centre, indexing="ij")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    object_masks = np.zeros((n, objects, size, size), dtype=bool)
    stripes = np.sin(yy * 2 * np.pi / 6 + 1.5 * np.sin(xx * 2 * np.pi / 11)) > 0.3
    quadrant = {0: (0.25, 0.25), 1: (0.25, 0.75), 2: (0.75, 0.25), 3: (0.75, 0.75)}
    captions, full = [], []
    for i in range(n):
        base, stripe = BACKGROUNDS[tuple(BACKGROUNDS)[f["background"][i]]]
        image = np.empty((size, size, 3), dtype=np.float64)
        image[:] = base
        if stripe is not None:
            image[stripes] = stripe
        for k in range(objects):
            cy, cx = quadrant[int(f["position"][i, k])]
            r = tuple(SIZES.values())[f["size"][i, k]] * size
            jitter = rng.uniform(-0.04, 0.04, 2) * size
            dy, dx = yy - (cy * size + jitter[0]), xx - (cx * size + jitter[1])
            mask = _shape_mask(SHAPES[f["shape"][i, k]], dy, dx, r)
            image[mask] = COLOURS[tuple(COLOURS)[f["colour"][i, k]]]
            object_masks[i, k] = mask
            object_masks[i, :k] &= ~mask  # a later object covers an earlier one
        images[i] = image.astype(np.uint8)
        values = {k: f[k][i] for k in FACTORS}
        named = {name for name in FACTORS if rng.random() < caption_factors}
        named = named or {FACTORS[rng.integers(len(FACTORS))]}
        captions.append(caption(values, named))
        full.append(caption(values))
    return World(images, object_masks.any(1), object_masks, f, captions, full)


def balanced_groups(n_per_group: int, correlation: Correlation, seed: int = 0, **kwargs) -> World:
    """A test world in which every (first, second) combination of the correlated pair's
    values in `correlation.pairs` appears `n_per_group` times."""
    firsts = list(correlation.pairs)
    seconds = list(dict.fromkeys(correlation.pairs.values()))
    worlds = []
    for g, (a, b) in enumerate((a, b) for a in firsts for b in seconds):
        pinned = Correlation(correlation.first, correlation.second, {a: b}, 1.0)
        world = generate(n_per_group * 8, seed=seed * 1000 + g, correlation=pinned, **kwargs)
        first = world.names(correlation.first)
        keep = np.flatnonzero(first == a)[:n_per_group]
        if len(keep) < n_per_group:
            raise RuntimeError("balanced_groups: too few draws of a group; raise the oversampling")
        worlds.append((world, keep))
    return World(
        np.concatenate([w.images[k] for w, k in worlds]),
        np.concatenate([w.masks[k] for w, k in worlds]),
        np.concatenate([w.object_masks[k] for w, k in worlds]),
        {name: np.concatenate([w.factors[name][k] for w, k in worlds]) for name in FACTORS},
        [w.captions[i] for w, k in worlds for i in k],
        [w.full_captions[i] for w, k in worlds for i in k],
    )
