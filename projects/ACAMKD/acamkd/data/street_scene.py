"""One synthetic street scene: layout, drawing order, rendering and label maps.

A scene is a list of layers drawn far to near, each a Cityscapes label name and a polygon in
integer pixel coordinates: exactly what a Cityscapes ``*_gtFine_polygons.json`` holds. The label
maps are rasterised from those polygons with PIL in drawing order, as cityscapesscripts'
``json2labelImg`` and ``json2instanceImg`` do, so the PNGs and the json agree pixel for pixel.
The image is painted through the same masks (OpenCV draws the details inside them), so what is
seen is what is labelled, occluded parts included.

The scenes are meant to be hard for a small detector trained briefly: many small and truncated
objects, occlusion, look-alike classes (person/rider, car/truck), people and bicycles painted on
posters and the road (labelled as background), textures, cast shadows, haze, lighting changes and
sensor noise.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image, ImageDraw

from . import street_sprites as sprites
from .streets_meta import STREETS_THING_CLASSES  # the classes drawn as instances

__all__ = [
    "STREETS_THING_CLASSES",
    "MIN_INSTANCE_PIXELS",
    "StreetScene",
    "render_street_scene",
]

# An instance is kept only if at least this many of its pixels stay visible (and at least
# MIN_VISIBLE_FRACTION of its silhouette): slivers behind other objects are no fair target.
MIN_INSTANCE_PIXELS = 12
MIN_VISIBLE_FRACTION = 0.1

_Color = Tuple[float, float, float]

# fmt: off
_CAR_COLORS: Tuple[_Color, ...] = (
    (225, 225, 222), (30, 30, 35), (170, 172, 178), (110, 112, 118), (170, 30, 30), (110, 20, 25),
    (40, 60, 140), (25, 35, 70), (40, 90, 60), (190, 175, 140), (220, 190, 40), (210, 110, 30),
    (95, 95, 100), (128, 64, 128),
)
_FACADE_COLORS: Tuple[_Color, ...] = (
    (200, 190, 170), (160, 160, 160), (150, 80, 60), (230, 225, 215), (120, 100, 80),
    (190, 170, 200), (170, 200, 190), (90, 90, 95), (210, 180, 130),
)
_SKIN_COLORS: Tuple[_Color, ...] = ((240, 200, 170), (200, 150, 110), (140, 90, 60), (90, 60, 40))
_PANTS_COLORS: Tuple[_Color, ...] = (
    (35, 45, 80), (25, 25, 28), (90, 90, 95), (170, 150, 110), (60, 50, 40), (120, 30, 40),
)
_HAIR_COLORS: Tuple[_Color, ...] = ((30, 25, 20), (90, 60, 30), (200, 170, 110), (120, 120, 120))
_TRUCK_BOX_COLORS: Tuple[_Color, ...] = (
    (230, 230, 230), (150, 150, 155), (40, 70, 150), (170, 40, 35), (220, 190, 50),
)
_BICYCLE_COLORS: Tuple[_Color, ...] = (
    (20, 20, 20), (180, 30, 30), (30, 60, 160), (200, 200, 200), (30, 120, 60),
)
_SKIES: Tuple[Tuple[_Color, _Color], ...] = (  # (top, horizon): clear, overcast, dusk
    ((70, 120, 200), (170, 200, 230)), ((175, 175, 180), (205, 205, 210)),
    ((60, 70, 120), (230, 150, 100)),
)
# fmt: on


@dataclass
class StreetScene:
    """A rendered scene and its annotations.

    Attributes:
        image (np.ndarray): (H, W, 3) uint8, RGB.
        objects (List[Tuple[str, np.ndarray]]): the annotated polygons in drawing order (a later
            one covers an earlier one): Cityscapes label name and (K, 2) int64 array of x, y.
        label_ids (np.ndarray): (H, W) uint8 Cityscapes label ids, 0 ("unlabeled") where no
            polygon lies.
        train_ids (np.ndarray): (H, W) uint8 Cityscapes train ids, 255 where ignored.
        instance_ids (np.ndarray): (H, W) int32: ``label id * 1000 + k`` on the k-th instance
            (k from 0, in drawing order) of a class with instances, the plain label id elsewhere.
    """

    image: np.ndarray
    objects: List[Tuple[str, np.ndarray]]
    label_ids: np.ndarray
    train_ids: np.ndarray
    instance_ids: np.ndarray


class _Camera:
    """A pinhole camera over a flat ground, looking along the street (z forward, metres)."""

    def __init__(self, width: int, height: int, rng: np.random.Generator):
        self.width, self.height = width, height
        self.horizon = height * rng.uniform(0.36, 0.5)
        self.vanish_x = width * rng.uniform(0.3, 0.7)
        self.cam_height = rng.uniform(1.3, 1.7)
        # Depth of the ground seen on the bottom row; it fixes the focal length in pixels.
        self.z_bottom = rng.uniform(3.5, 5.5)
        self.focal = (height - self.horizon) * self.z_bottom / self.cam_height

    def scale(self, z: float) -> float:
        """Pixels per metre at depth ``z``."""
        return self.focal / z

    def project(self, x, z, v=0.0) -> np.ndarray:
        """Image points (..., 2) of lateral position ``x``, depth ``z``, height ``v`` (metres)."""
        x, z, v = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, z, v)))
        s = self.focal / z
        return np.stack([self.vanish_x + x * s, self.horizon + (self.cam_height - v) * s], -1)

    def sprite(self, pts: np.ndarray, x: float, z: float) -> np.ndarray:
        """Project (K, 2) sprite points (u right, v up, metres) standing upright at (x, z)."""
        pts = np.asarray(pts, dtype=np.float64)
        return self.project(x + pts[:, 0], z, pts[:, 1])


class _Patch:
    """The bounding box of one layer: a float copy of the canvas there, and its mask."""

    def __init__(self, canvas: np.ndarray, mask: np.ndarray, box: Tuple[int, int, int, int]):
        x0, y0, x1, y1 = box
        self.x0, self.y0 = x0, y0
        self.img = canvas[y0:y1, x0:x1].copy()
        self.mask = mask[y0:y1, x0:x1]

    def local(self, pts: np.ndarray) -> np.ndarray:
        """Image points to this patch's cv2 coordinates (int32, 4 fractional bits)."""
        pts = np.asarray(pts, dtype=np.float64) - (self.x0, self.y0)
        return np.round(pts * 16).astype(np.int32)

    def fill(self, pts: np.ndarray, color) -> None:
        cv2.fillPoly(self.img, [self.local(pts)], _c(color), cv2.LINE_8, 4)

    def line(self, p: np.ndarray, q: np.ndarray, color, thickness: float) -> None:
        a, b = self.local(np.stack([p, q]))
        t = max(1, int(round(thickness)))
        a, b = tuple(int(v) for v in a), tuple(int(v) for v in b)
        cv2.line(self.img, a, b, _c(color), t, cv2.LINE_8, 4)

    def circle(self, center: np.ndarray, radius: float, color, thickness: float = -1) -> None:
        c = self.local(center[None])[0]
        t = -1 if thickness < 0 else max(1, int(round(thickness)))
        r = max(1, int(round(radius * 16)))
        cv2.circle(self.img, (int(c[0]), int(c[1])), r, _c(color), t, cv2.LINE_8, 4)

    def shade(self, top: float, bottom: float) -> None:
        """Multiply by a vertical ramp: light from above, darker towards the ground."""
        ramp = np.linspace(top, bottom, self.img.shape[0], dtype=np.float32)
        self.img *= ramp[:, None, None]

    def noise(self, rng: np.random.Generator, amplitude: float, cell: float = 0.0) -> None:
        """Add grey noise: per pixel, plus blotches of about ``cell`` pixels when given."""
        h, w = self.img.shape[:2]
        n = rng.normal(0.0, amplitude, (h, w)).astype(np.float32)
        if cell >= 2:
            n += _smooth_noise(rng, h, w, cell, 1.5 * amplitude)
        self.img += n[:, :, None]


def _c(color) -> Tuple[float, float, float]:
    return tuple(float(v) for v in color)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float, amp: float) -> np.ndarray:
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = rng.normal(0.0, amp, (gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _jitter(rng: np.random.Generator, color, amount: float = 15.0) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _random_color(rng: np.random.Generator, lo: float = 20, hi: float = 235) -> np.ndarray:
    return rng.uniform(lo, hi, 3).astype(np.float32)


def _bilinear(quad: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map unit-square points (a, b) into a quad given as corners (00, 10, 11, 01)."""
    a, b = pts[:, :1], pts[:, 1:]
    q00, q10, q11, q01 = quad
    return (1 - a) * (1 - b) * q00 + a * (1 - b) * q10 + a * b * q11 + (1 - a) * b * q01


@dataclass
class _Layer:
    # Cityscapes label name; None for an effect (a shadow) that is painted but not annotated.
    label: Optional[str]
    polygon: np.ndarray
    paint: Callable[[_Patch, np.random.Generator], None]
    # Layers are drawn by decreasing depth, ties in insertion order: the ground (inf), the
    # facades (1e6 + their near end, so nearer ones cover farther ones), then everything
    # standing in the street by its depth in metres.
    depth: float


class _SceneBuilder:
    """Lays out one scene as layers; ``build()`` returns them in drawing order."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, max_depth: float = 65.0):
        self.rng = rng
        self.max_depth = max_depth
        self.cam = _Camera(width, height, rng)
        self.width, self.height = width, height
        self.layers: List[_Layer] = []
        self.road_left = -rng.uniform(2.5, 7.0)
        self.road_right = rng.uniform(2.5, 7.0)
        self.walk_left = rng.uniform(1.5, 4.0)
        self.walk_right = rng.uniform(1.5, 4.0)
        self.z_end = rng.uniform(80.0, 400.0)
        self.z_near = 0.5 * self.cam.z_bottom

    # -- helpers -----------------------------------------------------------------------------

    def add(self, label, polygon, paint, depth) -> None:
        self.layers.append(_Layer(label, np.asarray(polygon, np.float64), paint, float(depth)))

    def ground_quad(self, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
        return self.cam.project([x0, x1, x1, x0], [z0, z0, z1, z1])

    def build(self) -> List[_Layer]:
        self._background()
        self._street_furniture()
        self._things()
        return sorted(self.layers, key=lambda layer: -layer.depth)

    # -- background: sky, ground, buildings --------------------------------------------------

    def _background(self) -> None:
        rng, cam, w, h = self.rng, self.cam, self.width, self.height
        sky_top, sky_low = (_jitter(rng, c) for c in _pick(rng, _SKIES))
        self.fog = _jitter(rng, sky_low, 10)

        def paint_sky(p: _Patch, rng: np.random.Generator) -> None:
            t = np.linspace(0, 1, p.img.shape[0], dtype=np.float32)[:, None, None]
            p.img[:] = (1 - t) * sky_top + t * sky_low
            clouds = np.maximum(_smooth_noise(rng, *p.img.shape[:2], 12, 1.0), 0)
            p.img += (rng.uniform(0, 40) * clouds)[:, :, None]

        self.add(
            "sky",
            [(0, 0), (w - 1, 0), (w - 1, cam.horizon + 1), (0, cam.horizon + 1)],
            paint_sky,
            math.inf,
        )
        self.add(
            "terrain",
            [(0, cam.horizon - 1), (w - 1, cam.horizon - 1), (w - 1, h - 1), (0, h - 1)],
            self._flat(_jitter(rng, (110, 130, 70), 20), 10, 6),
            math.inf,
        )
        self._road()
        for side in (-1, 1):
            self._sidewalk(side)
        self._cast_shadows()
        if self.z_end < 250:
            self._far_facade()
        for side in (-1, 1):
            self._buildings(side)

    def _flat(self, color, amplitude: float, cell: float):
        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = color
            p.noise(rng, amplitude, cell)

        return paint

    def _road(self) -> None:
        rng, cam = self.rng, self.cam
        xl, xr, zn, zf = self.road_left, self.road_right, self.z_near, self.z_end
        base = _jitter(rng, (rng.uniform(70, 120),) * 3, 6)
        lanes = np.arange(xl + rng.uniform(2.8, 3.6), xr - 1.5, rng.uniform(2.8, 3.6))
        crossing = rng.uniform(8, 25) if rng.random() < 0.25 else None
        symbol = (rng.uniform(7, 20), rng.uniform(xl + 0.5, max(xl + 0.6, xr - 1.5)))
        symbol = symbol if rng.random() < 0.35 else None

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = base
            p.noise(rng, 6, 10)
            white = _jitter(rng, (225, 225, 215), 10)
            for x in (xl + 0.2, xr - 0.2):  # edge lines
                p.fill(self.ground_quad(x - 0.08, x + 0.08, zn, zf), white)
            period, dash = rng.uniform(8, 12), rng.uniform(2.5, 4)
            for x in lanes:
                for z in np.arange(zn + rng.uniform(0, period), min(zf, 120), period):
                    p.fill(self.ground_quad(x - 0.07, x + 0.07, z, z + dash), white)
            if crossing is not None:
                for x in np.arange(xl + 0.3, xr - 0.3, 1.0):
                    p.fill(self.ground_quad(x, x + 0.5, crossing, crossing + 3.0), white)
            if symbol is not None:
                # A painted bicycle lane sign: a bicycle that is road, not "bicycle".
                z, x = symbol
                quad = self.ground_quad(x, x + 1.4, z, z + 2.2)
                bike = sprites.bicycle()
                for a, b in bike["frame"]:
                    uv = (np.stack([a, b]) + (0.75, 0.0)) / (1.5, 1.1)
                    pa, pb = _bilinear(quad, uv)
                    p.line(pa, pb, white, 1)
            for _ in range(int(rng.integers(0, 4))):  # manholes and patches
                z = rng.uniform(zn * 1.5, 30)
                x = rng.uniform(xl, xr)
                c = cam.project(x, z)
                s = cam.scale(z)
                cv2.ellipse(
                    p.img,
                    tuple(int(v) for v in p.local(c[None])[0]),
                    (int(16 * 0.4 * s) + 1, int(16 * 0.12 * s) + 1),
                    0,
                    0,
                    360,
                    _c(base * rng.uniform(0.5, 0.8)),
                    -1,
                    cv2.LINE_8,
                    4,
                )

        self.add("road", self.ground_quad(xl, xr, zn, zf), paint, math.inf)

    def _sidewalk(self, side: int) -> None:
        rng = self.rng
        edge = self.road_left if side < 0 else self.road_right
        width = self.walk_left if side < 0 else self.walk_right
        x0, x1 = sorted((edge, edge + side * width))
        zn, zf = self.z_near, self.z_end
        if rng.random() < 0.3:  # a grass strip between road and sidewalk
            grass = rng.uniform(0.6, 1.5)
            g0, g1 = sorted((edge, edge + side * grass))
            self.add(
                "terrain",
                self.ground_quad(g0, g1, zn, zf),
                self._flat(_jitter(rng, (100, 135, 60), 20), 12, 4),
                math.inf,
            )
        base = _jitter(rng, (170, 155, 155), 20)
        tile = rng.uniform(1.0, 2.0)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = base
            p.noise(rng, 7, 6)
            for z in np.arange(zn, min(zf, 60), tile):
                p.line(self.cam.project(x0, z), self.cam.project(x1, z), base * 0.8, 1)
            kerb = x0 if side > 0 else x1
            p.fill(self.ground_quad(kerb - 0.1, kerb + 0.1, zn, zf), _jitter(rng, (200, 200, 195)))

        self.add("sidewalk", self.ground_quad(x0, x1, zn, zf), paint, math.inf)

    def _cast_shadows(self) -> None:
        rng = self.rng
        for _ in range(int(rng.integers(0, 3))):
            side = _pick(rng, (-1, 1))
            x0 = self.road_left - self.walk_left if side < 0 else self.road_right + self.walk_right
            x1 = x0 - side * rng.uniform(2, 12)
            z0 = rng.uniform(self.z_near, 30)
            quad = self.ground_quad(min(x0, x1), max(x0, x1), z0, z0 + rng.uniform(5, 40))
            gain = rng.uniform(0.45, 0.75)

            def paint(p: _Patch, rng: np.random.Generator, gain=gain) -> None:
                p.img *= gain

            self.add(None, quad, paint, math.inf)

    def _facade_painter(self, corner, color, windows: Tuple[int, int], poster: bool):
        """Paint a facade whose corner(a, b) maps unit coordinates into the image."""

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = color
            p.noise(rng, 6, 5)
            cols, rows = windows
            a, b = np.meshgrid((np.arange(cols) + 0.25) / cols, (np.arange(rows) + 0.3) / rows)
            a, b = a.ravel(), b.ravel()
            da, db = 0.5 / cols, 0.45 / rows
            uv = np.stack(
                [np.stack(c, -1) for c in ((a, b), (a + da, b), (a + da, b + db), (a, b + db))], 1
            )
            quads = p.local(corner(uv.reshape(-1, 2))).reshape(-1, 4, 2)
            lit = rng.random(len(quads)) < 0.15
            for on, glass in ((lit, (210, 195, 130)), (~lit, (55, 65, 80))):
                if on.any():
                    glass = _c(_jitter(rng, glass, 15))
                    cv2.fillPoly(p.img, list(quads[on]), glass, cv2.LINE_8, 4)
            if poster:
                # An advertisement with a person or a car on it: labelled "building".
                a0, b0 = rng.uniform(0.1, 0.6), rng.uniform(0.02, 0.15)
                box = corner(
                    np.array([[a0, b0], [a0 + 0.3, b0], [a0 + 0.3, b0 + 0.25], [a0, b0 + 0.25]])
                )
                p.fill(box, _random_color(rng, 150, 250))
                sprite = sprites.person(rng, False) if rng.random() < 0.5 else sprites.car_rear(rng)
                pts = sprite["outline"]
                lo, hi = pts.min(0), pts.max(0)
                uv = 0.15 + 0.7 * (pts - lo) / np.maximum(hi - lo, 1e-6)
                p.fill(_bilinear(box, uv), _random_color(rng))

        return paint

    def _buildings(self, side: int) -> None:
        rng, cam = self.rng, self.cam
        base_x = self.road_left - self.walk_left if side < 0 else self.road_right + self.walk_right
        z = self.z_near * 0.6
        while z < self.z_end:
            length = rng.uniform(6, 25)
            if rng.random() < 0.2:  # a gap: the sky and whatever stands behind show through
                z += rng.uniform(3, 10)
                continue
            x = base_x + side * rng.uniform(0, 1.5)
            height = rng.uniform(6, 30)
            z0, z1 = z, min(z + length, self.z_end)

            def corner(uv, x=x, z0=z0, z1=z1, height=height):
                # a runs along the street (near to far), b upwards from the ground.
                zz = z0 + uv[:, 0] * (z1 - z0)
                return cam.project(x, zz, uv[:, 1] * height)

            polygon = corner(np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64))
            windows = (max(1, int((z1 - z0) / 3.5)), max(1, int(height / 3.2)))
            paint = self._facade_painter(
                corner, _jitter(rng, _pick(rng, _FACADE_COLORS)), windows, rng.random() < 0.35
            )
            # Each side is drawn far to near so nearer facades cover farther ones.
            self.add("building", polygon, paint, 1e6 + z0)
            z = z1

    def _far_facade(self) -> None:
        rng, cam = self.rng, self.cam
        x0 = self.road_left - self.walk_left - 5
        x1 = self.road_right + self.walk_right + 5
        height = rng.uniform(8, 30)
        z = self.z_end

        def corner(uv):
            return cam.project(x0 + uv[:, 0] * (x1 - x0), z, uv[:, 1] * height)

        polygon = corner(np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64))
        paint = self._facade_painter(
            corner, _jitter(rng, _pick(rng, _FACADE_COLORS)), (8, 4), False
        )
        self.add("building", polygon, paint, 2e6)

    # -- street furniture: trees, hedges, poles, signs, traffic lights -------------------------

    def _walk_x(self, side: int, margin: float = 0.3) -> float:
        """A lateral position on the left (side < 0) or right sidewalk, ``margin`` from edges."""
        width = self.walk_left if side < 0 else self.walk_right
        margin = min(margin, 0.45 * width)
        if side < 0:
            return self.rng.uniform(self.road_left - width + margin, self.road_left - margin)
        return self.rng.uniform(self.road_right + margin, self.road_right + width - margin)

    def _random_depth(self, x: float, far: float = 65.0, near: float = 0.0) -> float:
        """A depth at which lateral position ``x`` is in view, between ``near`` and ``far``."""
        cam = self.cam
        # Nearer than this, a point at x leaves the image sideways (a sidewalk runs off the
        # image edge long before its far end): nothing would be visible there.
        if x < 0:
            near = max(near, -x * cam.focal / (cam.vanish_x + 0.05 * cam.width))
        else:
            near = max(near, x * cam.focal / (1.05 * cam.width - cam.vanish_x))
        near = min(max(near, 0.9 * cam.z_bottom), 0.8 * far)
        # Log-uniform depth: as many objects 10-20 px tall as 40-80 px tall.
        return float(math.exp(self.rng.uniform(math.log(near), math.log(far))))

    def _thing_depth(self, x: float, far: float = 65.0, near: float = 0.0) -> float:
        """:meth:`_random_depth` of an annotated object: ``far`` is capped by ``max_depth``."""
        return self._random_depth(x, min(far, self.max_depth), near)

    def _street_furniture(self) -> None:
        rng, cam = self.rng, self.cam
        for _ in range(int(rng.integers(0, 7))):
            x = self._walk_x(_pick(rng, (-1, 1)))
            z = self._random_depth(x, 90)
            trunk_h, crown_r = rng.uniform(1.8, 3.2), rng.uniform(1.2, 2.8)
            trunk = cam.sprite(
                [(-0.15, 0), (0.15, 0), (0.12, trunk_h + crown_r), (-0.12, trunk_h + crown_r)], x, z
            )
            k = 16
            radii = crown_r * rng.uniform(0.8, 1.15, k)
            ang = np.linspace(0, 2 * math.pi, k, endpoint=False)
            crown = np.stack([radii * np.cos(ang), trunk_h + crown_r + radii * np.sin(ang)], -1)
            self.add("vegetation", trunk, self._flat(_jitter(rng, (90, 65, 45)), 8, 0), z)
            self.add("vegetation", cam.sprite(crown, x, z), self._leaves(), z - 1e-3)
        if rng.random() < 0.3:  # a hedge along the buildings
            side = _pick(rng, (-1, 1))
            x = (
                (self.road_left - self.walk_left + 0.4)
                if side < 0
                else (self.road_right + self.walk_right - 0.4)
            )
            z0 = rng.uniform(self.z_near, 20)
            z1 = z0 + rng.uniform(5, 30)
            hh = rng.uniform(0.8, 1.6)
            quad = cam.project([x, x, x, x], [z0, z1, z1, z0], [0, 0, hh, hh])
            self.add("vegetation", quad, self._leaves(), z0)
        for _ in range(int(rng.integers(1, 7))):
            edge = self.road_left - 0.4 if rng.random() < 0.5 else self.road_right + 0.4
            x = edge + rng.uniform(-0.2, 0.2)
            z = self._random_depth(x, 90)
            height, width = rng.uniform(3.0, 8.0), rng.uniform(0.12, 0.25)
            min_w = 1.2 / cam.scale(z)  # at least about one pixel wide
            hw = max(width, min_w) / 2
            pole = cam.sprite([(-hw, 0), (hw, 0), (hw, height), (-hw, height)], x, z)
            self.add(
                "pole",
                pole,
                self._metal(_jitter(rng, _pick(rng, ((120, 120, 125), (40, 60, 45))))),
                z,
            )
            kind = rng.random()
            if kind < 0.45:
                self._sign(x, z - 1e-3, rng.uniform(2.0, min(3.2, height)))
            elif kind < 0.7:
                self._traffic_light(x, z - 1e-3, min(height, rng.uniform(3.0, 5.0)))

    def _leaves(self):
        color = _jitter(self.rng, (70, 120, 40), 25)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = color
            p.noise(rng, 18, 2)

        return paint

    def _metal(self, color):
        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = color
            ramp = np.linspace(0.7, 1.2, p.img.shape[1], dtype=np.float32)
            p.img *= ramp[None, :, None]

        return paint

    def _sign(self, x: float, z: float, v: float) -> None:
        rng = self.rng
        r = rng.uniform(0.3, 0.45)
        shape = int(rng.integers(3))
        if shape == 0:  # round
            pts = sprites.arc(0, v, r, 0, 2 * math.pi, 12)[:-1]
        elif shape == 1:  # warning triangle
            pts = np.array([(-r, v - 0.8 * r), (r, v - 0.8 * r), (0, v + r)])
        else:  # rectangle
            pts = np.array(
                [(-1.3 * r, v - r), (1.3 * r, v - r), (1.3 * r, v + r), (-1.3 * r, v + r)]
            )
        outline = self.cam.sprite(pts, x, z)
        face = _pick(rng, ((200, 30, 30), (30, 70, 170), (240, 200, 40), (30, 120, 60)))
        face = _jitter(rng, face)
        inner = _jitter(rng, (235, 235, 235), 10)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = face
            centre = outline.mean(0)
            p.fill(centre + 0.6 * (outline - centre), inner)

        self.add("traffic sign", outline, paint, z)

    def _traffic_light(self, x: float, z: float, v: float) -> None:
        rng, cam = self.rng, self.cam
        box = cam.sprite([(-0.17, v - 0.9), (0.17, v - 0.9), (0.17, v), (-0.17, v)], x, z)
        lamp = int(rng.integers(3))

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = _jitter(rng, (35, 35, 35), 10)
            for i, color in enumerate(((230, 40, 30), (240, 180, 30), (40, 200, 80))):
                c = cam.sprite([(0, v - 0.15 - 0.3 * i)], x, z)[0]
                p.circle(c, 0.1 * cam.scale(z), color if i == lamp else (60, 60, 60))

        self.add("traffic light", box, paint, z)

    # -- things ------------------------------------------------------------------------------

    def _things(self) -> None:
        rng = self.rng
        spawners = (self._cars, self._people, self._cyclist, self._parked_bicycles, self._truck)
        weights = np.array([0.36, 0.32, 0.12, 0.08, 0.12])
        for _ in range(int(rng.integers(4, 17))):
            spawners[int(rng.choice(len(spawners), p=weights))]()

    def _contact_shadow(self, x: float, z: float, half_width: float) -> None:
        c = self.cam.project(x, z)
        s = self.cam.scale(z)
        ring = sprites.arc(0, 0, 1, 0, 2 * math.pi, 12)[:-1] * (half_width * s * 1.1, 0.25 * s)
        gain = self.rng.uniform(0.4, 0.7)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img *= gain

        self.add(None, c + ring, paint, z + 1e-4)

    def _cars(self) -> None:
        rng = self.rng
        xl, xr = self.road_left + 1.0, self.road_right - 1.0
        x = rng.uniform(xl, max(xl, xr))
        z = self._thing_depth(x)
        if rng.random() < 0.6:
            # A queue in one lane: the nearer car hides the lower part of the farther ones.
            for _ in range(1 + int(rng.integers(0, 3) if rng.random() < 0.35 else 0)):
                self._car(sprites.car_rear(rng), x + rng.uniform(-0.4, 0.4), z)
                z += rng.uniform(5.5, 12)
        else:
            sprite = sprites.car_side(rng)
            z = self._thing_depth(x, near=7.0)
            self._car(sprites.flip(sprite) if rng.random() < 0.5 else sprite, x, z)

    def _car(self, sprite: Dict[str, np.ndarray], x: float, z: float) -> None:
        rng, cam = self.rng, self.cam
        color = _jitter(rng, _pick(rng, _CAR_COLORS), 12)
        glass = _jitter(rng, (50, 60, 75), 15)
        tyre = (25, 25, 25)
        outline = cam.sprite(sprite["outline"], x, z)
        s = cam.scale(z)
        self._contact_shadow(x, z, np.ptp(sprite["outline"][:, 0]) / 2)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = color
            p.shade(1.15, 0.75)
            p.noise(rng, 4)
            p.fill(cam.sprite(sprite["glass"], x, z), glass)
            if "wheels" in sprite:  # side view
                for c in sprite["wheels"]:
                    cc = cam.sprite(c[None], x, z)[0]
                    p.circle(cc, float(sprite["radius"]) * s, tyre)
                    p.circle(cc, 0.5 * float(sprite["radius"]) * s, (150, 150, 150))
                p.fill(cam.sprite(sprite["front_light"], x, z), (235, 235, 210))
                p.fill(cam.sprite(sprite["rear_light"], x, z), (190, 30, 30))
            else:  # rear view
                tyres = cam.sprite(sprite["tyres"], x, z)
                p.line(tyres[0], tyres[1], tyre, 0.25 * s)
                p.line(tyres[2], tyres[3], tyre, 0.25 * s)
                for c in cam.sprite(sprite["lights"], x, z):
                    p.circle(c, 0.09 * s, (200, 25, 25))
                p.fill(cam.sprite(sprite["plate"], x, z), (230, 230, 225))
            if s > 12:
                cv2.polylines(p.img, [p.local(outline)], True, _c(color * 0.5), 1, cv2.LINE_8, 4)

        self.add("car", outline, paint, z)

    def _truck(self) -> None:
        rng, cam = self.rng, self.cam
        xl, xr = self.road_left + 1.3, self.road_right - 1.3
        # Not too near: a crossing truck a few metres away would hide the whole street.
        x = rng.uniform(xl, max(xl, xr))
        z = self._thing_depth(x, near=12.0)
        rear = rng.random() < 0.5
        sprite = sprites.truck_rear(rng) if rear else sprites.truck_side(rng)
        if not rear and rng.random() < 0.5:
            sprite = sprites.flip(sprite)
        box_color = _jitter(rng, _pick(rng, _TRUCK_BOX_COLORS))
        cab_color = _jitter(rng, _pick(rng, _CAR_COLORS))
        outline = cam.sprite(sprite["outline"], x, z)
        s = cam.scale(z)
        self._contact_shadow(x, z, np.ptp(sprite["outline"][:, 0]) / 2)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            p.img[:] = cab_color if not rear else box_color
            if not rear:
                p.fill(cam.sprite(sprite["box"], x, z), box_color)
                p.fill(cam.sprite(sprite["glass"], x, z), (50, 60, 75))
                for c in sprite["wheels"]:
                    p.circle(cam.sprite(c[None], x, z)[0], float(sprite["radius"]) * s, (25,) * 3)
            else:
                p.fill(cam.sprite(sprite["bumper"], x, z), (40, 40, 40))
                tyres = cam.sprite(sprite["tyres"], x, z)
                p.line(tyres[0], tyres[1], (25,) * 3, 0.4 * s)
                p.line(tyres[2], tyres[3], (25,) * 3, 0.4 * s)
                for c in cam.sprite(sprite["lights"], x, z):
                    p.circle(c, 0.1 * s, (200, 25, 25))
                top = cam.sprite(np.array([(0.0, 0.62), (0.0, float(sprite["height"]))]), x, z)
                p.line(top[0], top[1], box_color * 0.6, 0.04 * s)  # the doors' seam
            p.shade(1.1, 0.8)
            p.noise(rng, 4)

        self.add("truck", outline, paint, z)

    def _people(self) -> None:
        rng = self.rng
        side = _pick(rng, (-1, 1))
        on_road = rng.random() < 0.25
        x = rng.uniform(self.road_left, self.road_right) if on_road else self._walk_x(side)
        z = self._thing_depth(x, 50)
        # Pedestrians come in groups: neighbours overlap one another.
        for _ in range(1 + (int(rng.integers(1, 4)) if rng.random() < 0.35 else 0)):
            self._person(x, z)
            x += rng.uniform(-0.9, 0.9)
            z = max(0.9 * self.cam.z_bottom, z + rng.uniform(-1.5, 1.5))

    def _person(self, x: float, z: float, label: str = "person", sprite=None) -> None:
        rng, cam = self.rng, self.cam
        if sprite is None:
            sprite = sprites.person(rng, side_view=rng.random() < 0.5)
        if rng.random() < 0.5:
            sprite = sprites.flip(sprite)
        top = _random_color(rng)
        pants = _jitter(rng, _pick(rng, _PANTS_COLORS))
        skin = _jitter(rng, _pick(rng, _SKIN_COLORS), 10)
        hair = _jitter(rng, _pick(rng, _HAIR_COLORS))
        h, r = float(sprite["height"]), float(sprite["head_radius"])
        head_centre = sprite["outline"][np.argmax(sprite["outline"][:, 1])] - (0, r)
        outline = cam.sprite(sprite["outline"], x, z)
        s = cam.scale(z)
        if label == "person":
            self._contact_shadow(x, z, 0.3)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            # Clothes are painted as wide bands: only what lies inside the outline is kept.
            p.img[:] = top
            legs = cam.sprite(np.array([(-2, -1), (2, -1), (2, 0.5 * h), (-2, 0.5 * h)]), x, z)
            if label == "rider":
                legs = cam.sprite(np.array([(-2, -1), (2, -1), (2, 1.0), (-2, 1.0)]), x, z)
            p.fill(legs, pants)
            c = cam.sprite(head_centre[None], x, z)[0]
            p.circle(c, 1.2 * r * s, skin)
            p.circle(c - (0, 0.5 * r * s), 0.9 * r * s, hair)
            p.shade(1.1, 0.85)
            p.noise(rng, 6)

        self.add(label, outline, paint, z)

    def _bicycle_layer(self, sprite: Dict[str, np.ndarray], x: float, z: float) -> None:
        rng, cam = self.rng, self.cam
        frame = _jitter(rng, _pick(rng, _BICYCLE_COLORS))
        s = cam.scale(z)
        outline = cam.sprite(sprite["outline"], x, z)

        def paint(p: _Patch, rng: np.random.Generator) -> None:
            # Only the strokes are painted: the annotated outline is see-through, as in Cityscapes.
            for c in sprite["wheels"]:
                p.circle(
                    cam.sprite(c[None], x, z)[0],
                    float(sprite["radius"]) * s,
                    (25,) * 3,
                    max(1.0, 0.06 * s),
                )
            for a, b in sprite["frame"]:
                pa, pb = cam.sprite(np.stack([a, b]), x, z)
                p.line(pa, pb, frame, max(1.0, 0.04 * s))

        self.add("bicycle", outline, paint, z)

    def _cyclist(self) -> None:
        rng = self.rng
        side = _pick(rng, (-1, 1))
        edge = self.road_left + 0.8 if side < 0 else self.road_right - 0.8
        x = edge + rng.uniform(-0.3, 0.3)
        z = self._thing_depth(x, 50)
        bike, rider = sprites.bicycle(), sprites.rider()
        if rng.random() < 0.5:
            bike, rider = sprites.flip(bike), sprites.flip(rider)
        self._contact_shadow(x, z, 0.9)
        self._bicycle_layer(bike, x, z)
        # The rider sits in front of the bicycle: drawn just after it, in the same place.
        self._person(x, z - 1e-3, label="rider", sprite=rider)

    def _parked_bicycles(self) -> None:
        rng = self.rng
        x = self._walk_x(_pick(rng, (-1, 1)), 0.8)
        z = self._thing_depth(x, 50)
        flip = rng.random() < 0.5
        for _ in range(int(rng.integers(1, 4))):
            bike = sprites.flip(sprites.bicycle()) if flip else sprites.bicycle()
            self._bicycle_layer(bike, x, z)
            x, z = x + rng.uniform(0.3, 0.7), z - rng.uniform(0.2, 0.6)
            if z < 0.9 * self.cam.z_bottom:
                break


# -- rendering ---------------------------------------------------------------------------------


def _clip_polygon(poly: np.ndarray, width: int, height: int) -> Optional[np.ndarray]:
    """Clip to the image (Sutherland-Hodgman) and round to integer pixels, as Cityscapes stores."""
    pts = [tuple(p) for p in np.asarray(poly, np.float64)]
    for axis, bound, lower in (
        (0, 0.0, True),
        (0, width - 1.0, False),
        (1, 0.0, True),
        (1, height - 1.0, False),
    ):

        def inside(q, axis=axis, bound=bound, lower=lower):
            return q[axis] >= bound if lower else q[axis] <= bound

        def cross(p, q, axis=axis, bound=bound):
            t = (bound - p[axis]) / (q[axis] - p[axis])
            r = [p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])]
            r[axis] = bound
            return tuple(r)

        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        pts = out
        if len(pts) < 3:
            return None
    rounded = np.round(np.array(pts)).astype(np.int64)
    keep = np.any(rounded != np.roll(rounded, 1, axis=0), axis=1)
    rounded = rounded[keep]
    if len(rounded) < 3 or len(np.unique(rounded, axis=0)) < 3:
        return None
    return rounded


def _rasterize(poly: np.ndarray, width: int, height: int) -> np.ndarray:
    # PIL's polygon fill, the rasteriser of cityscapesscripts' json2labelImg/json2instanceImg.
    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).polygon([(int(x), int(y)) for x, y in poly], fill=1)
    return np.asarray(img, dtype=bool)


def _usable_instance(visible: np.ndarray, full_area: int) -> bool:
    """Enough of it is visible, and detectron2's Cityscapes PNG loader will keep it.

    That loader drops an instance whose box is flat or that has no outer contour (through
    pixel centres) of at least 3 points; a kept instance must be kept by every reader, or the
    layouts would disagree on the instance count.
    """
    n = int(visible.sum())
    if n < MIN_INSTANCE_PIXELS or n < MIN_VISIBLE_FRACTION * full_area:
        return False
    ys, xs = np.nonzero(visible)
    if xs.max() - xs.min() < 1 or ys.max() - ys.min() < 1:
        return False
    contours = cv2.findContours(visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[
        -2
    ]
    return any(len(c) >= 3 and cv2.contourArea(c) > 0 for c in contours)


def _layer_map(masks: List[np.ndarray], shape: Tuple[int, int]) -> np.ndarray:
    owner = np.full(shape, -1, np.int32)
    for i, m in enumerate(masks):
        owner[m] = i
    return owner


def _finish(image: np.ndarray, rng: np.random.Generator, horizon: float, fog) -> np.ndarray:
    """Camera and light: haze near the horizon, uneven light, exposure, colour cast, noise, blur."""
    h, w = image.shape[:2]
    ys = np.arange(h, dtype=np.float32)[:, None, None]
    haze = rng.uniform(0.0, 0.45) * np.exp(-np.abs(ys - horizon) / (0.08 * h))
    image = (1 - haze) * image + haze * fog
    angle = rng.uniform(0, 2 * math.pi)
    xx, yy = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    light = 1.0 + rng.uniform(0.0, 0.25) * (math.cos(angle) * xx + math.sin(angle) * yy)
    image = image * light[:, :, None].astype(np.float32)
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.7, 1.15) + mean * rng.uniform(0.55, 1.25)
    image = image * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** rng.uniform(0.8, 1.25)
    image = image + rng.normal(0, rng.uniform(2, 7), image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.8))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_street_scene(
    rng: np.random.Generator, width: int = 320, height: int = 160, max_depth: float = 65.0
) -> StreetScene:
    """Lay out, annotate and render one street scene.

    Args:
        rng (np.random.Generator): the only source of randomness; the same generator state
            gives the same scene, bit for bit.
        width (int): image width in pixels.
        height (int): image height in pixels.
        max_depth (float): the farthest depth, in metres, at which cars, trucks, people and
            bicycles stand (people and bicycles at most 50 m). Depths are log-uniform from
            the nearest visible one, so a smaller value means fewer tiny objects.

    Returns:
        StreetScene: the image, the polygons in drawing order and the three label maps.
    """
    builder = _SceneBuilder(rng, width, height, max_depth)
    layers = []
    for layer in builder.build():
        poly = _clip_polygon(layer.polygon, width, height)
        if poly is not None:
            layers.append((layer, poly, _rasterize(poly, width, height)))

    # Drop instances hidden behind nearer ones. Dropping only uncovers the others, so the
    # loop ends; it rarely runs twice.
    while True:
        annotated = [item for item in layers if item[0].label is not None]
        owner = _layer_map([m for _, _, m in annotated], (height, width))
        hidden = {
            id(layer)
            for i, (layer, _, mask) in enumerate(annotated)
            if layer.label in STREETS_THING_CLASSES
            and not _usable_instance(owner == i, int(mask.sum()))
        }
        if not hidden:
            break
        layers = [item for item in layers if id(item[0]) not in hidden]

    canvas = np.zeros((height, width, 3), np.float32)
    for layer, poly, mask in layers:
        # PIL fills within the polygon's bounds, ends included.
        (x0, y0), (x1, y1) = poly.min(0), poly.max(0) + 1
        patch = _Patch(canvas, mask, (int(x0), int(y0), int(x1), int(y1)))
        layer.paint(patch, rng)
        canvas[y0:y1, x0:x1][patch.mask] = patch.img[patch.mask]
    image = _finish(canvas, rng, builder.cam.horizon, builder.fog)

    label_ids = np.zeros((height, width), np.uint8)  # "unlabeled" is id 0
    train_ids = np.full((height, width), 255, np.uint8)
    instance_ids = np.zeros((height, width), np.int32)
    counts: Dict[str, int] = {}
    objects = []
    for i, (layer, poly, _) in enumerate(annotated):
        label = name2label[layer.label]
        region = owner == i
        label_ids[region] = label.id
        train_ids[region] = label.trainId if 0 <= label.trainId < 255 else 255
        if label.hasInstances:
            k = counts.get(label.name, 0)
            counts[label.name] = k + 1
            instance_ids[region] = label.id * 1000 + k
        else:
            instance_ids[region] = label.id
        objects.append((layer.label, poly))
    return StreetScene(image, objects, label_ids, train_ids, instance_ids)
