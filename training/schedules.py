"""DeepSeek-V3's schedules: the MTP loss weight and the balancing speed as piecewise-constant values over the run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepSchedule:
    """A piecewise-constant value over the fraction of training done, written `VALUE[@FRACTION],...`.

    `"0.3,0.1@0.7"` is 0.3 until 70% of the steps, then 0.1: DeepSeek-V3's MTP weight (0.3 for the first 10T of
    14.8T tokens, then 0.1). `"1e-3,0@0.97"` is its balancing speed (frozen for the last 500B tokens).
    """

    points: tuple[tuple[float, float], ...]  # (from_fraction, value), sorted

    @classmethod
    def parse(cls, text: str | float, name: str = "schedule") -> StepSchedule:
        if isinstance(text, (int, float)):
            return cls(((0.0, float(text)),))
        points = []
        for part in str(text).split(","):
            value, _, start = part.strip().partition("@")
            try:
                point = (float(start) if start else 0.0, float(value))
            except ValueError:
                raise ValueError(
                    f"{name}: cannot read {part!r}; write VALUE[@FRACTION],... e.g. '0.3,0.1@0.7'"
                ) from None
            if not 0.0 <= point[0] <= 1.0 or point[1] < 0:
                raise ValueError(f"{name}: {part!r} needs a fraction in [0, 1] and a non-negative value")
            points.append(point)
        points.sort()
        if points[0][0] != 0.0:
            raise ValueError(f"{name}: {text!r} must give a value from the start (a first entry without @FRACTION)")
        return cls(tuple(points))

    def __call__(self, step: int, total_steps: int) -> float:
        fraction = step / max(total_steps, 1)
        value = self.points[0][1]
        for start, point_value in self.points:
            if fraction >= start:
                value = point_value
        return value


def apply_schedules(config, schedules: dict[str, StepSchedule], step: int, total_steps: int) -> None:
    """Sets each scheduled config attribute to its value at `step` of `total_steps`."""
    for name, schedule in schedules.items():
        setattr(config, name, schedule(step, total_steps))
