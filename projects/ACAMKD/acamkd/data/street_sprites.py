"""Outlines of the objects in the synthetic streets, as annotators would draw them.

Each function returns a sprite: a dict of point arrays in metres (u to the right, v up, origin
on the ground under the middle), with ``"outline"`` the one simple polygon that is annotated and
the other entries the parts painted inside it (windows, wheels, lights, a bicycle's frame).
Side views face +u; ``flip`` mirrors them.
"""

import math
from typing import Dict, List, Sequence

import numpy as np

__all__ = [
    "arc",
    "car_side",
    "car_rear",
    "truck_side",
    "truck_rear",
    "person",
    "rider",
    "bicycle",
    "flip",
]


def arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int) -> np.ndarray:
    """Points on a circle (y up), from angle a0 to a1 (radians), both ends included."""
    a = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], -1)


def _wheeled_bottom(x0: float, x1: float, wheels: Sequence[float], r: float) -> List:
    """Bottom edge from x0 to x1 at height r, dipping round each wheel to the ground."""
    pts = [(x0, r)]
    for cx in sorted(wheels):
        pts.extend(arc(cx, r, r, math.pi, 2 * math.pi, 7).tolist())
    pts.append((x1, r))
    return pts


def car_side(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """A car seen from the side (3.8-4.8 m long): outline, side windows, wheels, lights."""
    length, height, r = rng.uniform(3.8, 4.8), rng.uniform(1.35, 1.55), 0.31
    h = length / 2
    wheels = (-h + 0.75, h - 0.8)
    roof_front, roof_rear = h - rng.uniform(1.5, 1.9), -h + rng.uniform(0.6, 1.2)
    outline = _wheeled_bottom(-h + 0.02, h, wheels, r) + [
        (h, 0.35),
        (h + 0.02, 0.7),
        (h - 0.15, 0.85),
        (h - 1.1, 0.95),
        (roof_front, height),
        (roof_rear, height),
        (-h + 0.2, 0.98),
        (-h, 0.9),
        (-h - 0.02, 0.4),
    ]
    glass = [
        (h - 1.2, 0.99),
        (roof_front + 0.05, height - 0.07),
        (roof_rear + 0.08, height - 0.07),
        (-h + 0.4, 0.99),
    ]
    return {
        "outline": np.array(outline),
        "glass": np.array(glass),
        "wheels": np.array([(cx, r) for cx in wheels]),
        "radius": np.array(r),
        "front_light": np.array(
            [(h - 0.15, 0.6), (h + 0.01, 0.6), (h + 0.01, 0.72), (h - 0.15, 0.72)]
        ),
        "rear_light": np.array([(-h, 0.7), (-h + 0.15, 0.7), (-h + 0.15, 0.82), (-h, 0.82)]),
    }


def car_rear(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """A car seen from behind (1.65-1.95 m wide): outline, rear window, lights, plate, tyres."""
    width, height = rng.uniform(1.65, 1.95), rng.uniform(1.35, 1.6)
    h, roof = width / 2, rng.uniform(0.32, 0.4) * width
    outline = [
        (-h + 0.05, 0),
        (h - 0.05, 0),
        (h, 0.3),
        (h, 0.75),
        (h - 0.08, 0.86),
        (roof, height),
        (-roof, height),
        (-h + 0.08, 0.86),
        (-h, 0.75),
        (-h, 0.3),
    ]
    glass = [
        (h - 0.2, 0.92),
        (roof - 0.05, height - 0.08),
        (-roof + 0.05, height - 0.08),
        (-h + 0.2, 0.92),
    ]
    return {
        "outline": np.array(outline),
        "glass": np.array(glass),
        "lights": np.array([(-h + 0.22, 0.72), (h - 0.22, 0.72)]),
        "plate": np.array([(-0.26, 0.4), (0.26, 0.4), (0.26, 0.52), (-0.26, 0.52)]),
        "tyres": np.array([(-h + 0.05, 0), (-h + 0.3, 0), (h - 0.3, 0), (h - 0.05, 0)]),
    }


def truck_side(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """A box truck seen from the side (6.5-9 m long): outline, cab window, box, 2-3 axles."""
    length, box_h, cab_h, r = (
        rng.uniform(6.5, 9.0),
        rng.uniform(3.0, 3.8),
        rng.uniform(2.7, 3.0),
        0.48,
    )
    h = length / 2
    wheels = (-h + 1.2, -h + 2.25, h - 1.3) if rng.random() < 0.5 else (-h + 1.3, h - 1.3)
    outline = _wheeled_bottom(-h, h, wheels, r) + [
        (h, 1.7),
        (h - 0.25, cab_h),
        (h - 2.2, cab_h),
        (h - 2.3, box_h),
        (-h, box_h),
    ]
    glass = [(h - 0.05, 1.75), (h - 0.28, cab_h - 0.1), (h - 1.0, cab_h - 0.1), (h - 1.0, 1.75)]
    return {
        "outline": np.array(outline),
        "glass": np.array(glass),
        "box": np.array([(-h, r), (h - 2.3, r), (h - 2.3, box_h), (-h, box_h)]),
        "wheels": np.array([(cx, r) for cx in wheels]),
        "radius": np.array(r),
    }


def truck_rear(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """A box truck seen from behind (3-3.8 m tall): outline, bumper, lights, tyres."""
    width, height = rng.uniform(2.35, 2.55), rng.uniform(3.0, 3.8)
    h = width / 2
    outline = [(-h + 0.05, 0), (h - 0.05, 0), (h, 0.45), (h, height), (-h, height), (-h, 0.45)]
    return {
        "outline": np.array(outline),
        "bumper": np.array([(-h, 0.45), (h, 0.45), (h, 0.62), (-h, 0.62)]),
        "lights": np.array([(-h + 0.15, 0.75), (h - 0.15, 0.75)]),
        "tyres": np.array([(-h + 0.05, 0), (-h + 0.5, 0), (h - 0.5, 0), (h - 0.05, 0)]),
        "height": np.array(height),
    }


def person(rng: np.random.Generator, side_view: bool) -> Dict[str, np.ndarray]:
    """A walking person (one in eight a child), from the front or the side."""
    h = rng.uniform(1.5, 1.95) if rng.random() > 0.12 else rng.uniform(1.0, 1.35)
    sw = h * (0.16 if side_view else 0.25)
    hw = h * (0.13 if side_view else 0.19)
    d = rng.uniform(0.18, 0.5) * h / 1.75
    arm = sw / 2 + 0.02 * h
    r = 0.065 * h
    head = arc(0.0, h - r, r, -math.pi / 3, 4 * math.pi / 3, 9)
    outline = [
        (-d / 2 - 0.09, 0),
        (-d / 2 + 0.07, 0),
        (0, 0.45 * h),
        (d / 2 - 0.07, 0),
        (d / 2 + 0.09, 0),
        (hw / 2, 0.5 * h),
        (arm, 0.4 * h),
        (sw / 2, 0.8 * h),
        (0.045 * h / 1.75, 0.85 * h),
        *head.tolist(),
        (-0.045 * h / 1.75, 0.85 * h),
        (-sw / 2, 0.8 * h),
        (-arm, 0.4 * h),
        (-hw / 2, 0.5 * h),
    ]
    return {"outline": np.array(outline), "height": np.array(h), "head_radius": np.array(r)}


def rider() -> Dict[str, np.ndarray]:
    """A rider on the bicycle of ``bicycle()``, facing +u (legs, torso, arm and head)."""
    head = arc(0.06, 1.66, 0.11, 1.1 * math.pi, -0.2 * math.pi, 9)
    outline = [
        (-0.07, 0.28),
        (0.02, 0.66),
        (-0.3, 0.9),
        (-0.32, 1.05),
        (-0.12, 1.5),
        (-0.04, 1.56),
        *head.tolist(),
        (0.12, 1.52),
        (0.15, 1.45),
        (0.46, 1.06),
        (0.42, 0.99),
        (0.08, 1.28),
        (0.02, 1.06),
        (0.2, 0.84),
        (0.22, 0.74),
        (0.1, 0.28),
    ]
    return {"outline": np.array(outline), "height": np.array(1.77), "head_radius": np.array(0.11)}


def bicycle() -> Dict[str, np.ndarray]:
    """A bicycle facing +u: the outline annotators would draw round wheels and frame."""
    r, rear, front = 0.34, -0.52, 0.53
    outline = [
        *arc(rear, r, r, 0.5 * math.pi, 1.75 * math.pi, 9).tolist(),
        (0.0, 0.2),
        *arc(front, r, r, 1.25 * math.pi, 2.3 * math.pi, 9).tolist(),
        (0.48, 1.02),
        (0.36, 1.02),
        (0.37, 0.84),
        (-0.14, 0.88),
        (-0.12, 0.97),
        (-0.34, 0.97),
        (-0.3, 0.86),
    ]
    joints = {
        "rear": (rear, r),
        "front": (front, r),
        "crank": (0.0, 0.3),
        "seat": (-0.22, 0.9),
        "head": (0.37, 0.84),
        "bar": (0.45, 1.0),
    }
    frame = [
        ("rear", "crank"),
        ("crank", "seat"),
        ("seat", "rear"),
        ("crank", "head"),
        ("seat", "head"),
        ("head", "front"),
        ("head", "bar"),
    ]
    return {
        "outline": np.array(outline),
        "wheels": np.array([(rear, r), (front, r)]),
        "radius": np.array(r),
        "frame": np.array([(joints[a], joints[b]) for a, b in frame]),
    }


def flip(sprite: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Mirror a sprite left-right (every array of points; scalars unchanged)."""
    out = {}
    for k, v in sprite.items():
        if v.ndim >= 2 and v.shape[-1] == 2:
            v = v.copy()
            v[..., 0] *= -1
        out[k] = v
    return out
