"""NumPy rendering of synthetic scenes: textured shapes on textured backgrounds, with ground truth.

The class of an object is its shape only.  Colours, textures, sizes, positions and rotations are
drawn independently of the class, so a representation that separates the classes has learnt shape.
Objects are painted in order, later ones over earlier ones (occlusion), and the label maps record
exactly what was painted: `class_map` (0 background, 1..K shape) and `instance_map` (0 background,
i = the i-th object painted).
"""

import dataclasses

import numpy as np
from skimage.draw import polygon2mask

SHAPES = ("disc", "square", "triangle", "ring", "cross", "star")
TEXTURES = ("flat", "stripes", "checker", "noise")

# Shape sizes in units of the object radius, chosen so every shape covers 1.8-2.9 radius^2 of area
# (a disc of radius 1 would be 3.14): pixel shares of the classes then stay comparable.
_DISC_RADIUS = 0.9
_RING_RADII = (0.55, 1.0)
_SQUARE_HALF_SIDE = 0.85
_TRIANGLE_RADIUS = 1.25
_CROSS_HALF_WIDTH = 0.33
_STAR_RADII = (1.25, 0.5)  # outer tips, inner corners
_NOISE_STD = 24.0  # grey levels; enough texture for FH to notice, little enough to keep the colour
_MAX_PLACEMENT_TRIES = 30


@dataclasses.dataclass(frozen=True)
class SceneParams:
    """How scenes look: size in pixels, objects per scene, object radius as a fraction of size."""

    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 6
    min_radius: float = 0.12
    max_radius: float = 0.25
    # Every earlier object keeps at least this fraction of its own pixels visible.
    min_visible: float = 0.35
    # Smallest RGB distance between any object colour and any background colour.
    min_contrast: float = 60.0

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"--image_size must be >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"--min_objects={self.min_objects} and --max_objects={self.max_objects} must "
                "satisfy 1 <= min_objects <= max_objects"
            )
        if not 0.0 < self.min_radius <= self.max_radius <= 0.5:
            raise ValueError(
                f"--min_radius={self.min_radius} and --max_radius={self.max_radius} must satisfy "
                "0 < min_radius <= max_radius <= 0.5 (fractions of the image size)"
            )


@dataclasses.dataclass(frozen=True)
class Texture:
    """A fill: `kind` in TEXTURES, two RGB colours, stripe/check period (pixels) and angle."""

    kind: str
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    period: float
    angle: float


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One painted object: `shape` index into SHAPES, centre (row, col), radius (pixels), angle."""

    shape: int
    centre: tuple[float, float]
    radius: float
    angle: float
    texture: Texture


@dataclasses.dataclass(frozen=True)
class Scene:
    """`image` uint8 `[H, W, 3]`, `class_map`/`instance_map` uint8 `[H, W]`, objects in paint order."""

    image: np.ndarray
    class_map: np.ndarray
    instance_map: np.ndarray
    objects: tuple[SceneObject, ...]
    background: Texture


def _polygon(shape: str) -> np.ndarray:
    """Returns the `[N, 2]` (x, y) vertices of a polygonal shape of unit radius, unrotated."""
    if shape == "square":
        s = _SQUARE_HALF_SIDE
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return _TRIANGLE_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "cross":
        w = _CROSS_HALF_WIDTH
        return np.array(
            [[1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
             [-1, w], [-1, -w], [-w, -w], [-w, -1], [w, -1], [w, -w]]
        )  # fmt: skip
    if shape == "star":
        outer, inner = _STAR_RADII
        angles = np.pi / 2 + np.pi * np.arange(10) / 5
        radii = np.where(np.arange(10) % 2 == 0, outer, inner)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"unknown polygonal shape {shape!r}")


def shape_area(shape: int) -> float:
    """Returns the exact area of shape `shape` (index into SHAPES) at radius 1."""
    name = SHAPES[shape]
    if name == "disc":
        return float(np.pi * _DISC_RADIUS**2)
    if name == "ring":
        return float(np.pi * (_RING_RADII[1] ** 2 - _RING_RADII[0] ** 2))
    x, y = _polygon(name).T
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Returns bool `[S, S]`: the pixels (by their centres) that shape `obj` covers."""
    name = SHAPES[obj.shape]
    row, col = obj.centre
    if name in ("disc", "ring"):
        rows, cols = np.mgrid[:image_size, :image_size]
        distance = np.hypot(rows - row, cols - col) / obj.radius
        if name == "disc":
            return distance <= _DISC_RADIUS
        return (distance >= _RING_RADII[0]) & (distance <= _RING_RADII[1])
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    xy = _polygon(name) @ np.array([[c, s], [-s, c]]) * obj.radius
    # polygon2mask wants (row, col) vertices; y grows downwards like rows.
    vertices = np.stack([row + xy[:, 1], col + xy[:, 0]], axis=1)
    return polygon2mask((image_size, image_size), vertices)


def fill(texture: Texture, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Returns float32 `[S, S, 3]` pixels of `texture` over the whole image (draws noise from rng)."""
    colour_a = np.asarray(texture.colours[0], np.float32)
    colour_b = np.asarray(texture.colours[1], np.float32)
    rows, cols = np.mgrid[:image_size, :image_size].astype(np.float32)
    u = cols * np.cos(texture.angle) + rows * np.sin(texture.angle)
    v = -cols * np.sin(texture.angle) + rows * np.cos(texture.angle)
    if texture.kind == "flat":
        second = np.zeros_like(u, dtype=bool)
    elif texture.kind == "stripes":
        second = np.floor(u / texture.period) % 2 == 1
    elif texture.kind == "checker":
        second = (np.floor(u / texture.period) + np.floor(v / texture.period)) % 2 == 1
    elif texture.kind == "noise":
        noise = rng.normal(0.0, _NOISE_STD, (image_size, image_size, 3)).astype(np.float32)
        return colour_a + noise
    else:
        raise ValueError(f"unknown texture {texture.kind!r}; expected one of {TEXTURES}")
    return np.where(second[..., None], colour_b, colour_a)


def _random_colour(
    rng: np.random.Generator, avoid: tuple[tuple[int, int, int], ...], min_distance: float
) -> tuple[int, int, int]:
    """Returns a uniform random RGB colour at least `min_distance` from every colour in `avoid`."""
    while True:
        colour = rng.integers(0, 256, 3)
        if all(np.linalg.norm(colour - np.asarray(a)) >= min_distance for a in avoid):
            return tuple(int(c) for c in colour)


def random_texture(
    rng: np.random.Generator,
    image_size: int,
    avoid: tuple[tuple[int, int, int], ...] = (),
    min_distance: float = 0.0,
) -> Texture:
    """Returns a texture of random kind, colours (away from `avoid`), period and angle."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    colours = (
        _random_colour(rng, avoid, min_distance),
        _random_colour(rng, avoid, min_distance),
    )
    # Periods scale with the image so textures look alike at every --image_size.
    period = float(rng.uniform(3.0, 7.0) * image_size / 64)
    return Texture(kind, colours, period, float(rng.uniform(0.0, np.pi)))


def random_object(
    rng: np.random.Generator,
    params: SceneParams,
    background: Texture,
    shape: int | None = None,
    centred: bool = False,
) -> SceneObject:
    """Returns an object with random shape (unless given), size, place, angle and texture.

    `centred` keeps the whole object inside the central 87.5 % that evaluation crops keep.
    """
    if shape is None:
        shape = int(rng.integers(len(SHAPES)))
    size = params.image_size
    radius = float(rng.uniform(params.min_radius, params.max_radius) * size)
    if centred:
        # The star's tips reach 1.25 radii; jitter stays inside the 6.25 % margin on each side.
        slack = max(0.0, 0.4375 * size - _STAR_RADII[0] * radius)
        centre = tuple(float(c) for c in size / 2 - 0.5 + rng.uniform(-slack, slack, 2))
    else:
        # At least about half of the object lies inside the frame.
        centre = tuple(float(c) for c in rng.uniform(0.3 * radius, size - 0.3 * radius, 2))
    angle = float(rng.uniform(0.0, 2 * np.pi))
    texture = random_texture(rng, size, background.colours, params.min_contrast)
    return SceneObject(shape, centre, radius, angle, texture)


def paint(
    background: Texture,
    objects: tuple[SceneObject, ...],
    image_size: int,
    rng: np.random.Generator,
) -> Scene:
    """Returns the scene with `objects` painted in order over `background` (later ones on top)."""
    image = fill(background, image_size, rng)
    class_map = np.zeros((image_size, image_size), np.uint8)
    instance_map = np.zeros((image_size, image_size), np.uint8)
    for index, obj in enumerate(objects, start=1):
        mask = object_mask(obj, image_size)
        image = np.where(mask[..., None], fill(obj.texture, image_size, rng), image)
        class_map[mask] = obj.shape + 1
        instance_map[mask] = index
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(pixels, class_map, instance_map, tuple(objects), background)


def _placement_keeps_visible(
    masks: list[np.ndarray], visible: list[np.ndarray], new: np.ndarray, min_visible: float
) -> bool:
    """Returns whether every earlier object keeps `min_visible` of its pixels once `new` is on top."""
    if not new.any():
        return False
    return all(
        np.count_nonzero(seen & ~new) >= min_visible * np.count_nonzero(mask)
        for mask, seen in zip(masks, visible, strict=True)
    )


def random_scene(rng: np.random.Generator, params: SceneParams) -> Scene:
    """Returns a scene of `min_objects`..`max_objects` random objects (fewer if placement fails)."""
    background = random_texture(rng, params.image_size)
    count = int(rng.integers(params.min_objects, params.max_objects + 1))
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for _ in range(count):
        for _ in range(_MAX_PLACEMENT_TRIES):
            candidate = random_object(rng, params, background)
            mask = object_mask(candidate, params.image_size)
            if _placement_keeps_visible(masks, visible, mask, params.min_visible):
                visible = [seen & ~mask for seen in visible] + [mask]
                masks.append(mask)
                objects.append(candidate)
                break
    return paint(background, tuple(objects), params.image_size, rng)


def single_object_scene(rng: np.random.Generator, params: SceneParams, shape: int) -> Scene:
    """Returns a scene of one centred object of class `shape` on a random background."""
    background = random_texture(rng, params.image_size)
    obj = random_object(rng, params, background, shape=shape, centred=True)
    return paint(background, (obj,), params.image_size, rng)
