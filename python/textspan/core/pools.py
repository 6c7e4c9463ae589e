"""Text pools: the project's own default pool of image descriptions, and user text files.

The default pool is composed here, deterministically, from hand-written word lists over the
properties CLIP heads are known to specialise in (colours, shapes, textures, materials,
objects, animals, scenes, places, weather, lighting, time of day, styles, counts, positions,
moods): every single-property description, then seeded combinations of two properties
until the pool holds `DEFAULT_POOL_SIZE` distinct lines.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

from ..errors import InputError, MissingFileError

__all__ = [
    "DEFAULT_POOL_SIZE",
    "common_words",
    "default_pool",
    "default_topics",
    "load_texts",
    "topic_of",
]

DEFAULT_POOL_SIZE = 3600

COLOURS = [
    *"red orange yellow green blue purple pink brown black white gray beige turquoise teal "
    "maroon gold silver lavender crimson cyan magenta ivory".split(),
    "navy blue",
    "olive green",
    "pale blue",
    "dark green",
]
SHAPES = [
    *"circle square triangle rectangle star heart hexagon diamond oval spiral cross crescent "
    "cube sphere cone cylinder pyramid arch ring".split(),
    "zigzag line",
]
TEXTURES = (
    "striped polka-dotted checkered furry smooth rough wrinkled glossy matte fluffy scaly "
    "woven knitted cracked rusty bumpy grainy spiky wavy marbled dotted plaid"
).split()
MATERIALS = (
    "wood metal glass stone plastic paper leather fabric concrete brick marble ceramic rubber "
    "wool silk cotton steel bamboo ice copper"
).split()
OBJECTS = [
    *"chair table lamp bicycle car bus train boat airplane umbrella clock bottle cup book "
    "guitar piano phone laptop camera shoe hat backpack kite ball teapot vase candle key "
    "bridge tower house fence bench mailbox ladder bucket basket mirror window door sofa bed "
    "pillow spoon knife pizza cake apple banana bread sandwich flower tree tent helmet violin "
    "television".split(),
    "traffic light",
    "toy robot",
]
ANIMALS = (
    "dog cat horse cow sheep pig chicken duck goose owl eagle parrot penguin flamingo fish "
    "shark dolphin whale turtle frog snake lizard butterfly bee spider rabbit squirrel deer "
    "fox wolf bear lion tiger zebra giraffe elephant monkey camel kangaroo goat"
).split()
SCENES = [
    *"beach forest desert kitchen bedroom office classroom library supermarket restaurant farm "
    "lake river waterfall harbour airport garden park playground stadium jungle cave highway "
    "bakery".split(),
    "mountain range",
    "snowy field",
    "city street",
    "living room",
    "train station",
    "coral reef",
]
COUNTRIES = [
    "Japan",
    "France",
    "Italy",
    "Brazil",
    "Egypt",
    "India",
    "Mexico",
    "Kenya",
    "Norway",
    "Greece",
    "China",
    "Peru",
    "Morocco",
    "Iceland",
    "Australia",
    "Canada",
    "Scotland",
    "Thailand",
    "Turkey",
    "Spain",
    "Vietnam",
    "Argentina",
    "Russia",
    "Ireland",
    "Nepal",
    "Cuba",
    "Switzerland",
    "Indonesia",
    "South Africa",
    "the Netherlands",
]
CITIES = [
    "Paris",
    "Tokyo",
    "New York",
    "London",
    "Venice",
    "Cairo",
    "Rio de Janeiro",
    "Istanbul",
    "Sydney",
    "Hong Kong",
]
WEATHER = "rainy snowy foggy sunny cloudy stormy windy misty hazy overcast frosty".split()
LIGHTING = [
    *"soft harsh warm cold dim bright neon golden dramatic natural moonlit".split(),
    "studio",
    "candle",
    "flash",
]
TIMES = [
    "at dawn",
    "at sunrise",
    "in the morning",
    "at noon",
    "in the afternoon",
    "at sunset",
    "at dusk",
    "at night",
]
STYLES = [
    "a watercolor painting",
    "an oil painting",
    "a pencil sketch",
    "a charcoal drawing",
    "a cartoon",
    "a comic book panel",
    "an anime illustration",
    "pixel art",
    "a 3D render",
    "a low-poly model",
    "a vintage photograph",
    "a black and white photo",
    "a long exposure photo",
    "a macro photo",
    "an aerial photo",
    "a panoramic photo",
    "a blurry photo",
    "a close-up photo",
    "a selfie",
    "a mosaic",
    "a stained glass window",
    "graffiti",
    "a woodcut print",
    "pop art",
    "an impressionist painting",
    "a cubist painting",
    "a child's drawing",
    "a technical diagram",
    "an infographic",
    "an x-ray image",
]
COUNTS = "two three four five six seven eight nine ten many".split()
POSITIONS = [
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "center",
    "left side",
    "right side",
    "top",
    "bottom",
    "edge",
]
MOODS = (
    "cheerful gloomy peaceful chaotic romantic mysterious eerie nostalgic playful lonely cozy "
    "festive tense calm melancholic energetic dreamy serene spooky joyful"
).split()

_IRREGULAR = {
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "goose": "geese",
    "knife": "knives",
    "shelf": "shelves",
    "wolf": "wolves",
    "bread": "loaves of bread",
    "toy robot": "toy robots",
    "traffic light": "traffic lights",
}


def _plural(noun: str) -> str:
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if re.search(r"(s|sh|ch|x)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _singles() -> Iterator[str]:
    """Every description of one property."""
    for c in COLOURS:
        yield from (f"something {c}", f"a photo with {c} tones", f"a mostly {c} image")
    for s in SHAPES:
        yield from (f"{_a(s)}", f"{_a(s)} shape", f"an object shaped like {_a(s)}")
    for t in TEXTURES:
        yield from (f"a {t} texture", f"a {t} pattern")
    for m in MATERIALS:
        yield from (f"something made of {m}", f"a {m} surface")
    for o in OBJECTS:
        yield from (f"a photo of {_a(o)}", f"{_a(o)}")
    for a in ANIMALS:
        yield from (f"a photo of {_a(a)}", f"{_a(a)}")
    for s in SCENES:
        yield from (f"a photo of {_a(s)}", f"a view of {_a(s)}")
    for p in COUNTRIES + CITIES:
        yield from (f"a photo taken in {p}", f"a street in {p}")
    for w in WEATHER:
        yield from (f"{w} weather", f"a {w} day")
    for light in LIGHTING:
        yield from (f"{light} light", f"a scene in {light} lighting")
    for t in TIMES:
        yield from (f"a photo taken {t}", f"the sky {t}")
    yield from STYLES
    for n in COUNTS:
        yield f"{n} objects"
    for p in POSITIONS:
        yield from (f"an object at the {p} of the image", f"something in the {p}")
    for m in MOODS:
        yield from (f"a {m} mood", f"a {m} scene")


def _pairs(rng: random.Random) -> Iterator[str]:
    """Random two-property descriptions, each kind equally often."""
    kinds: list[Callable[[], str]] = [
        lambda: f"{_a(rng.choice(COLOURS))} {rng.choice(OBJECTS)}",
        lambda: f"{_a(rng.choice(COLOURS))} {rng.choice(SHAPES)}",
        lambda: f"{_a(rng.choice(ANIMALS))} in {_a(rng.choice(SCENES))}",
        lambda: f"{rng.choice(STYLES)} of {_a(rng.choice(ANIMALS + OBJECTS))}",
        lambda: f"{rng.choice(COUNTS)} {_plural(rng.choice(ANIMALS + OBJECTS))}",
        lambda: f"{_a(rng.choice(OBJECTS))} made of {rng.choice(MATERIALS)}",
        lambda: f"{_a(rng.choice(TEXTURES))} {rng.choice(SHAPES)}",
        lambda: f"{_a(rng.choice(SCENES))} on {_a(rng.choice(WEATHER))} day",
        lambda: f"{rng.choice(COUNTRIES + CITIES)} {rng.choice(TIMES)}",
        lambda: f"{_a(rng.choice(SHAPES))} at the {rng.choice(POSITIONS)}",
        lambda: f"{_a(rng.choice(MOODS))} {rng.choice(SCENES)}",
        lambda: f"{_a(rng.choice(ANIMALS))} in {rng.choice(LIGHTING)} light",
        lambda: f"{_a(rng.choice(COLOURS))} {rng.choice(ANIMALS)}",
        lambda: f"{_a(rng.choice(OBJECTS))} in {rng.choice(COUNTRIES + CITIES)}",
    ]
    while True:
        for kind in kinds:
            yield kind()


@cache
def _default_pool(size: int) -> tuple[str, ...]:
    seen: dict[str, None] = dict.fromkeys(_singles())
    pairs = _pairs(random.Random(0))
    while len(seen) < size:
        seen.setdefault(next(pairs), None)
    return tuple(seen)[:size]


def default_pool(size: int = DEFAULT_POOL_SIZE) -> list[str]:
    """The project's default pool of short image descriptions (deterministic)."""
    if size < 1:
        raise InputError(f"size: expected at least 1 text, got {size}")
    return list(_default_pool(size))


_STOP = frozenset(
    "a an the of in on at with and made something photo image scene object objects view "
    "mostly taken like shaped shape tones surface street day light lighting sky".split()
)


def common_words() -> list[str]:
    """Single words: the vocabulary of the default pool without its function words
    (the word baseline of the replacement study)."""
    words = {w for text in default_pool() for w in re.findall(r"[a-z][a-z'-]*", text.lower())}
    return sorted(words - _STOP)


def load_texts(path: str | os.PathLike) -> list[str]:
    """One text per non-empty line of a UTF-8 file, stripped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MissingFileError(f"text pool: no such file {path}") from None
    except UnicodeDecodeError as e:
        raise InputError(
            f"text pool {path}: expected UTF-8 text, got undecodable bytes ({e})"
        ) from None
    texts = [t.strip() for t in lines if t.strip()]
    if not texts:
        raise InputError(f"text pool {path}: expected one text per line, got an empty file")
    return texts


def default_topics() -> dict[str, list[str]]:
    """The default pool's word lists, by topic: what a text of the pool is about."""
    return {
        "colour": COLOURS,
        "shape": SHAPES,
        "texture": TEXTURES,
        "material": MATERIALS,
        "object": OBJECTS,
        "animal": ANIMALS,
        "scene": SCENES,
        "place": COUNTRIES + CITIES,
        "weather": WEATHER,
        "lighting": LIGHTING,
        "time": TIMES,
        "style": STYLES,
        "count": COUNTS,
        "position": POSITIONS,
        "mood": MOODS,
    }


def topic_of(text: str, topics: dict[str, list[str]]) -> str:
    """The first topic (in `topics`' order) one of whose phrases the text contains as whole
    words, or "other"."""
    lowered = f" {re.sub(r'[^a-z0-9-]+', ' ', text.lower())} "
    for topic, phrases in topics.items():
        for phrase in phrases:
            if f" {re.sub(r'[^a-z0-9-]+', ' ', phrase.lower()).strip()} " in lowered:
                return topic
    return "other"
