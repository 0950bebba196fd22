"""Procedural crack masks: branching random walks with a tapering width profile.

A crack is a main walk (a heading that wanders with small random turns and is pulled back
towards its first direction) plus a few shorter branches that leave it at an angle. Each walk
is drawn as a connected 1-px skeleton thickened by discs whose diameter shrinks along the walk.
Everything is drawn from the ``numpy.random.Generator`` passed in, so a mask is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.draw import disk, line

from indusfactory.infra.errors import BadInputError

STEP_PX = 1.0
"""Length of one walk step in pixels (at most 1 so the skeleton stays connected)."""


@dataclass(frozen=True)
class CrackStyle:
    """Parameters of one kind of crack.

    length: range of the main walk's length, as a fraction of the shorter image side.
    width: range of the start width in pixels (the end width is ``start * (1 - taper)``, >= 1).
    branches: inclusive range of the number of branches leaving the main walk.
    turn_std: standard deviation of the heading change per 1-px step, in radians (wander).
    straightness: per-step pull of the heading back to the initial one, 0 (none) to 1.
    taper: fraction of the start width lost by the end of a walk, 0 to 1.
    branch_length: range of a branch's length as a fraction of the main walk's length.
    """

    length: tuple[float, float]
    width: tuple[float, float]
    branches: tuple[int, int]
    turn_std: float
    straightness: float
    taper: float
    branch_length: tuple[float, float] = (0.25, 0.5)

    def __post_init__(self) -> None:
        for name in ("length", "width", "branches", "branch_length"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise BadInputError(f"CrackStyle.{name} must be a range 0 <= low <= high, got {(low, high)}")
        if self.width[0] < 1:
            raise BadInputError(f"CrackStyle.width must be at least 1 px, got {self.width}")
        if self.turn_std < 0:
            raise BadInputError(f"CrackStyle.turn_std must be >= 0, got {self.turn_std}")
        for name in ("straightness", "taper"):
            if not 0 <= getattr(self, name) <= 1:
                raise BadInputError(f"CrackStyle.{name} must be in [0, 1], got {getattr(self, name)}")


CRACK_STYLES: dict[str, CrackStyle] = {
    "hairline": CrackStyle(
        length=(0.55, 0.9),
        width=(1.0, 2.0),
        branches=(0, 1),
        turn_std=0.07,
        straightness=0.08,
        taper=0.3,
        branch_length=(0.15, 0.3),
    ),
    "branched": CrackStyle(
        length=(0.4, 0.7),
        width=(2.0, 4.0),
        branches=(2, 4),
        turn_std=0.2,
        straightness=0.04,
        taper=0.7,
        branch_length=(0.25, 0.5),
    ),
}
"""The named crack styles; ``random_crack_mask`` accepts these names or a ``CrackStyle``."""


@dataclass(frozen=True)
class _Walk:
    """Points (row, col) of a walk inside the image, the heading at each, and its start width."""

    points: np.ndarray
    angles: np.ndarray
    start_width: float


def resolve_style(style: str | CrackStyle) -> CrackStyle:
    """The ``CrackStyle`` for a name in ``CRACK_STYLES`` (or the style itself)."""
    if isinstance(style, CrackStyle):
        return style
    if style not in CRACK_STYLES:
        known = ", ".join(sorted(CRACK_STYLES))
        raise BadInputError(f"unknown crack style {style!r}; known styles: {known}")
    return CRACK_STYLES[style]


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """(height, width) as ints, or a clear error."""
    if len(shape) != 2 or min(int(shape[0]), int(shape[1])) < 1:
        raise BadInputError(f"crack mask shape must be (height, width) with both >= 1, got {shape}")
    return int(shape[0]), int(shape[1])


def _walk(
    start: np.ndarray,
    heading: float,
    n_steps: int,
    style: CrackStyle,
    shape: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A wandering walk from ``start``; stops at the last point inside the image."""
    turns = rng.normal(0.0, style.turn_std, n_steps)
    angles = np.empty(n_steps + 1)
    angles[0] = heading
    for i in range(n_steps):
        angles[i + 1] = angles[i] + turns[i] - style.straightness * (angles[i] - heading)
    steps = STEP_PX * np.stack([np.sin(angles[1:]), np.cos(angles[1:])], axis=1)
    points = np.vstack([start, start + np.cumsum(steps, axis=0)])
    inside = (points[:, 0] >= 0) & (points[:, 0] <= shape[0] - 1) & (points[:, 1] >= 0) & (points[:, 1] <= shape[1] - 1)
    end = len(points) if inside.all() else int(np.argmin(inside))
    return points[: max(end, 1)], angles[: max(end, 1)]


def _main_walk(shape: tuple[int, int], style: CrackStyle, rng: np.random.Generator) -> _Walk:
    """The crack's trunk: starts anywhere, heads roughly across the image."""
    side = min(shape)
    start = rng.uniform(0.1, 0.9, 2) * (np.array(shape) - 1)
    target = rng.uniform(0.3, 0.7, 2) * (np.array(shape) - 1)
    heading = float(np.arctan2(target[0] - start[0], target[1] - start[1]) + rng.normal(0.0, 0.5))
    n_steps = max(1, int(round(rng.uniform(*style.length) * side / STEP_PX)))
    width = float(rng.uniform(*style.width))
    points, angles = _walk(start, heading, n_steps, style, shape, rng)
    return _Walk(points, angles, width)


def _branch(trunk: _Walk, style: CrackStyle, shape: tuple[int, int], rng: np.random.Generator) -> _Walk:
    """A shorter walk leaving the trunk at an angle, as wide as the trunk is there (a bit less)."""
    n = len(trunk.points)
    at = int(rng.integers(int(0.15 * n), max(int(0.8 * n), int(0.15 * n) + 1)))
    side_sign = 1.0 if rng.random() < 0.5 else -1.0
    heading = float(trunk.angles[at] + side_sign * rng.uniform(0.35, 1.1))
    n_steps = max(1, int(round(rng.uniform(*style.branch_length) * n)))
    width = max(1.0, 0.75 * _widths(trunk, style)[at])
    points, angles = _walk(trunk.points[at], heading, n_steps, style, shape, rng)
    return _Walk(points, angles, width)


def _widths(walk: _Walk, style: CrackStyle) -> np.ndarray:
    """Width in pixels at each point of a walk: linear taper, never below 1 px."""
    t = np.linspace(0.0, 1.0, len(walk.points))
    return np.maximum(1.0, walk.start_width * (1.0 - style.taper * t))


def _draw(mask: np.ndarray, walk: _Walk, style: CrackStyle) -> None:
    """Paint a walk into ``mask``: a connected skeleton plus a disc of its width at each point."""
    rounded = np.rint(walk.points).astype(int)
    mask[rounded[0, 0], rounded[0, 1]] = True
    for (r0, c0), (r1, c1) in zip(rounded[:-1], rounded[1:]):
        mask[line(r0, c0, r1, c1)] = True
    for (r, c), width in zip(walk.points, _widths(walk, style)):
        if width > 1.25:
            mask[disk((r, c), width / 2.0, shape=mask.shape)] = True


def random_crack_mask(shape: tuple[int, int], style: str | CrackStyle, rng: np.random.Generator) -> np.ndarray:
    """A boolean (H, W) mask of one crack: never empty, reproducible for a given ``rng`` state."""
    shape = _check_shape(shape)
    crack_style = resolve_style(style)
    mask = np.zeros(shape, dtype=bool)
    trunk = _main_walk(shape, crack_style, rng)
    _draw(mask, trunk, crack_style)
    for _ in range(int(rng.integers(crack_style.branches[0], crack_style.branches[1] + 1))):
        _draw(mask, _branch(trunk, crack_style, shape, rng), crack_style)
    return mask
