"""Procedural "toy world": one coloured, styled shape on a plain background.

A small text-to-image model is trained on these images; concept erasure is then
measured with :mod:`svare_core.toyworld.oracle`, which reads the attributes back.
Everything here is deterministic: randomness only comes from the ``rng`` passed in,
and :func:`make_dataset` derives one generator per item from ``(seed, index)`` so a
dataset can be generated in chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SS = 4  # supersampling factor: render at 4x, box-downsample for anti-aliased edges

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart")
# Hues are >= ~30 degrees apart and white is far brighter than anything else,
# so the colours stay separable after blur / colour drift.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (40, 185, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 225, 40),
    "purple": (155, 45, 210),
    "orange": (250, 135, 15),
    "white": (240, 240, 240),
}
STYLES: tuple[str, ...] = ("solid", "striped", "dotted", "outlined")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
}
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "style", "background")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "style": STYLES,
    "background": tuple(BACKGROUNDS),
}
# Darker shade used for the gaps of striped / dotted fills. 0.3 (not 0.35) keeps
# the dark shade of white (72) clearly apart from the gray background (110).
SHADE = 0.3
STRIPE_PERIOD, STRIPE_ON = 5, 3  # px at 64: 3 rows colour, 2 rows dark shade
DOT_PERIOD, DOT_RADIUS = 7.0, 3.0  # px at 64: colour covers ~58% of the fill
OUTLINE_WIDTH = 3  # px at 64
RADIUS_RANGE = (12.0, 22.0)

# (shape, colour, style) combos never used for training; every shape, colour
# and style occurs at least once so compositional generalisation can be probed.
HELD_OUT_COMBOS: frozenset[tuple[str, str, str]] = frozenset({
    ("circle", "red", "striped"),
    ("square", "green", "dotted"),
    ("triangle", "blue", "outlined"),
    ("star", "yellow", "solid"),
    ("heart", "purple", "striped"),
    ("circle", "orange", "outlined"),
    ("square", "white", "solid"),
    ("triangle", "purple", "dotted"),
    ("star", "orange", "striped"),
    ("heart", "blue", "dotted"),
    ("square", "red", "outlined"),
    ("triangle", "white", "striped"),
})

# Paraphrases that never occur in training captions (tests check this), used to
# probe whether an erasure generalises beyond the literal training word.
SYNONYMS: dict[str, list[str]] = {
    "red": ["crimson", "scarlet"],
    "green": ["emerald", "jade"],
    "blue": ["azure", "cobalt"],
    "yellow": ["golden", "lemon"],
    "purple": ["violet", "amethyst"],
    "orange": ["tangerine", "amber"],
    "white": ["ivory", "snowy"],
    "circle": ["disc", "round shape"],
    "square": ["box", "block"],
    "triangle": ["three-sided shape", "pyramid"],
    "star": ["five-pointed star", "pentagram"],
    "heart": ["love heart", "valentine"],
    "solid": ["plain", "filled"],
    "striped": ["banded", "pinstriped"],
    "dotted": ["polka-dot", "spotted"],
    "outlined": ["hollow", "unfilled"],
    "black": ["dark", "jet"],
    "gray": ["grey", "silver"],
}


# ----------------------------------------------------------------------------- shapes
def _unit_polygons() -> dict[str, np.ndarray]:
    """Shape outlines in units of the scene radius, centred at 0, y pointing down."""
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    square = np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])
    triangle = np.array([[0.0, -0.95], [1.0, 0.8], [-1.0, 0.8]])
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)  # fat star: survives blur
    star = np.stack([rad * np.cos(ang), rad * np.sin(ang) + 0.095], 1)
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    hx = 16 * np.sin(t) ** 3
    hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    heart = np.stack([hx, hy - 2.5], 1) / 16.5
    return {"circle": circle, "square": square, "triangle": triangle, "star": star, "heart": heart}


UNIT_POLYGONS = _unit_polygons()
# Half extents (x, y) of each unit shape around the centre: used to keep shapes inside.
_EXTENTS = {k: (np.abs(p).max(0)) for k, p in UNIT_POLYGONS.items()}


@dataclass(frozen=True)
class Scene:
    """One image: a single shape of radius ``radius`` px centred at (cx, cy)."""

    shape: str
    colour: str
    style: str
    background: str
    cx: float
    cy: float
    radius: float

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.style)

    def label(self, attribute: str) -> str:
        return getattr(self, attribute)


def shape_polygon(shape: str, cx: float, cy: float, radius: float, scale: float = 1.0) -> list[tuple[float, float]]:
    """Polygon vertices in pixel coordinates (times ``scale``) for PIL drawing."""
    p = UNIT_POLYGONS[shape] * radius + np.array([cx, cy])
    return [tuple(v) for v in (p * scale).tolist()]


def _draw_mask(shape: str, cx: float, cy: float, radius: float, size: int, scale: float,
               outline: float | None = None) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    poly = shape_polygon(shape, cx, cy, radius, scale)
    if outline is None:
        d.polygon(poly, fill=255)
    else:  # PIL draws polygon outlines inside the polygon, which is what we want
        d.polygon(poly, outline=255, width=max(1, int(round(outline * scale))))
    return np.asarray(im) > 127


def mask(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean filled silhouette of the scene's shape at ``size`` x ``size``."""
    return _draw_mask(scene.shape, scene.cx, scene.cy, scene.radius, size, size / IMAGE_SIZE)


def _patterns() -> dict[str, np.ndarray]:
    n = IMAGE_SIZE * _SS
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / _SS  # pixel centres in 64-px units
    striped = (np.floor(y) % STRIPE_PERIOD) < STRIPE_ON
    dx = (x % DOT_PERIOD) - DOT_PERIOD / 2
    dy = (y % DOT_PERIOD) - DOT_PERIOD / 2
    dotted = dx * dx + dy * dy <= DOT_RADIUS ** 2
    return {"striped": striped, "dotted": dotted}


_PATTERNS = _patterns()


def render(scene: Scene) -> np.ndarray:
    """Render ``scene`` to a uint8 array (64, 64, 3); anti-aliased via 4x supersampling."""
    n = IMAGE_SIZE * _SS
    fill = _draw_mask(scene.shape, scene.cx, scene.cy, scene.radius, n, _SS)
    if scene.style == "outlined":
        col, dark = _draw_mask(scene.shape, scene.cx, scene.cy, scene.radius, n, _SS, OUTLINE_WIDTH), None
    elif scene.style == "solid":
        col, dark = fill, None
    else:
        pat = _PATTERNS[scene.style]
        col, dark = fill & pat, fill & ~pat

    def cov(m: np.ndarray) -> np.ndarray:  # box-filter downsample of a binary layer
        return m.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean((1, 3), dtype=np.float32)[..., None]

    c = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    a = cov(col)
    img = bg + a * (c - bg)
    if dark is not None:
        img += cov(dark) * (c * SHADE - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- sampling
def sample_scene(rng: np.random.Generator, *, exclude: set | frozenset | None = None) -> Scene:
    """Random scene; ``exclude`` is a set of (shape, colour, style) combos to avoid."""
    while True:  # rejection: exclude sets are small, so this loops ~1.1 times
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = VALUES["colour"][rng.integers(len(COLOURS))]
        style = STYLES[rng.integers(len(STYLES))]
        if not exclude or (shape, colour, style) not in exclude:
            break
    background = VALUES["background"][rng.integers(len(BACKGROUNDS))]
    radius = float(rng.uniform(*RADIUS_RANGE))
    ex, ey = _EXTENTS[shape] * radius + 1.0  # 1 px margin for the anti-aliased edge
    cx = float(rng.uniform(ex, IMAGE_SIZE - ex))
    cy = float(rng.uniform(ey, IMAGE_SIZE - ey))
    return Scene(shape, colour, style, background, cx, cy, radius)


def is_held_out(scene: Scene) -> bool:
    """True if the scene's (shape, colour, style) combo is reserved for evaluation."""
    return scene.combo in HELD_OUT_COMBOS


# ----------------------------------------------------------------------------- captions
MENTION_PROB = {"colour": 0.8, "shape": 0.8, "style": 0.6, "background": 0.4}
# Alternative wording of each style, appended after the noun ("a star with dots").
STYLE_SUFFIX = {"solid": "in solid colour", "striped": "with stripes",
                 "dotted": "with dots", "outlined": "drawn as an outline"}
_BG_PHRASES = ("on a {} background", "on {}", "against a {} background")
_FRAMES = ("{}", "{}", "{}", "a picture of {}", "an image of {}", "a drawing of {}", "a simple icon of {}")


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _noun_phrase(shape: str | None, colour: str | None, style: str | None, noun: str = "shape") -> str:
    return _article(" ".join(w for w in (style, colour, shape or noun) if w))


def full_caption(shape: str | None = None, colour: str | None = None, style: str | None = None,
                 background: str | None = None) -> str:
    """Canonical caption naming exactly the given attributes, e.g. ``"a red star"``.

    Used for evaluation prompts; with no attribute at all it is ``"a shape"``.
    """
    cap = _noun_phrase(shape, colour, style)
    return cap + (f" on a {background} background" if background else "")


def paraphrase_caption(shape: str | None = None, colour: str | None = None, style: str | None = None,
                       background: str | None = None, *, attribute: str | None = None,
                       synonym_index: int = 0) -> str:
    """Like :func:`full_caption`, but one attribute is named by a synonym from SYNONYMS.

    ``attribute`` picks which one (default: the first given of colour, shape, style,
    background); ``synonym_index`` picks the paraphrase (modulo the list length).
    """
    given = {"shape": shape, "colour": colour, "style": style, "background": background}
    if attribute is None:
        attribute = next((a for a in ("colour", "shape", "style", "background") if given[a]), None)
        if attribute is None:
            raise ValueError("paraphrase_caption needs at least one attribute")
    value = given[attribute]
    if value is None:
        raise ValueError(f"attribute {attribute!r} is not given")
    syns = SYNONYMS[value]
    given[attribute] = syns[synonym_index % len(syns)]
    return full_caption(**given)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Random training caption; only ever names the scene's true attribute values.

    Each attribute is mentioned independently (colour/shape 0.8, style 0.6,
    background 0.4) so the model learns to fill in what a prompt leaves open.
    """
    m = {a: rng.random() < p for a, p in MENTION_PROB.items()}
    shape = scene.shape if m["shape"] else None
    colour = scene.colour if m["colour"] else None
    style = scene.style if m["style"] else None
    form = rng.integers(4)
    if form == 1 and style:  # style as a suffix: "a blue square with stripes"
        np_ = _noun_phrase(shape, colour, None) + " " + STYLE_SUFFIX[style]
    elif form == 2 and not shape and (colour or style):  # "something purple"
        np_ = "something " + " and ".join(w for w in (style, colour) if w)
    elif form == 3 and shape and colour and not style:  # "a star, red"
        np_ = f"{_article(shape)}, {colour}"
    else:  # "a striped blue square"
        np_ = _noun_phrase(shape, colour, style, noun=("shape", "figure", "object")[rng.integers(3)])
    cap = _FRAMES[rng.integers(len(_FRAMES))].format(np_)
    if m["background"]:
        cap += " " + _BG_PHRASES[rng.integers(len(_BG_PHRASES))].format(scene.background)
    return cap


# ----------------------------------------------------------------------------- datasets
def make_scenes(n: int, seed: int, *, offset: int = 0, include_held_out: bool = False) -> list[Scene]:
    """Scenes ``offset .. offset+n-1`` of the stream for ``seed`` (see make_dataset)."""
    exclude = None if include_held_out else HELD_OUT_COMBOS
    return [sample_scene(np.random.default_rng([seed, i]), exclude=exclude) for i in range(offset, offset + n)]


def make_dataset(n: int, seed: int, *, include_held_out: bool = False, offset: int = 0
                 ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Items ``offset .. offset+n-1`` of a deterministic, infinite dataset stream.

    Item ``i`` only depends on ``(seed, i)``, so chunks concatenate to the whole.
    Returns images uint8 [n, 64, 64, 3], captions, and labels: attribute -> int64
    indices into ``VALUES[attribute]``.
    """
    exclude = None if include_held_out else HELD_OUT_COMBOS
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions: list[str] = []
    labels = {a: np.empty(n, np.int64) for a in ATTRIBUTES}
    index = {a: {v: k for k, v in enumerate(VALUES[a])} for a in ATTRIBUTES}
    for j in range(n):
        rng = np.random.default_rng([seed, offset + j])
        scene = sample_scene(rng, exclude=exclude)
        images[j] = render(scene)
        captions.append(caption(scene, rng))
        for a in ATTRIBUTES:
            labels[a][j] = index[a][scene.label(a)]
    return images, captions, labels
