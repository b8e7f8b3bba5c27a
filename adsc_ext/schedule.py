"""ADSC schedules: which decoder layers downsample the vision tokens, and by how much.

Text form (spec section 2): comma-separated ``layer:factor`` pairs, e.g. ``"8:2,16:2,24:2"``.
``layer`` is the 0-based decoder layer *before which* the downsampling happens, ``factor`` is 2
(halve the longer side of the image grid; on a tie, the width) or 4 (halve both sides). The empty
string is the unmodified model. The grammar is the C core's (``adsc_schedule_parse``): numbers are
1 to 9 ASCII digits, and spaces and tabs (no other whitespace) may surround them; a test checks
through the C ABI that the two parsers accept and reject the same texts.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

from .errors import ScheduleError

__all__ = [
    "LLAVA15_DEFAULT",
    "ScheduleError",
    "Step",
    "StageInfo",
    "Schedule",
    "downsample_grid",
    "kept_axis_indices",
    "newline_flag",
]

#: The default schedule for LLaVA-1.5: 576 -> 288 -> 144 -> 72 vision tokens per image.
LLAVA15_DEFAULT = "8:2,16:2,24:2"

#: Largest layer number: the text form holds at most 9 digits per number (as the C parser).
MAX_LAYER = 999_999_999

# One item of the text form: 1-9 ASCII digits, ':', 1-9 ASCII digits, spaces/tabs around each.
_ITEM = re.compile(r"[ \t]*([0-9]{1,9})[ \t]*:[ \t]*([0-9]{1,9})[ \t]*")

_max_steps: Optional[int] = None


def max_steps() -> Optional[int]:
    """The most downsampling steps a schedule may have: ``ADSC_MAX_STEPS`` of the compiled core,
    read from the extension (``adsc_ext._C.MAX_STEPS``); None when the extension is not built,
    where nothing would run the schedule and no limit is enforced."""
    global _max_steps
    if _max_steps is None:
        try:
            import torch  # noqa: F401  (the extension links libtorch)

            from . import _C
        except ImportError:
            return None
        limit = getattr(_C, "MAX_STEPS", None)
        if limit is None:
            raise ImportError(
                "adsc_ext._C is out of date (it has no MAX_STEPS): rebuild it with "
                "`pip install --no-build-isolation -e .`"
            )
        _max_steps = int(limit)
    return _max_steps


def __getattr__(name):
    if name == "MAX_STEPS":  # the compiled core's limit, read on first use
        return max_steps()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

Grid = Tuple[int, int]


def _halve(n: int) -> int:
    return (n + 1) // 2


def kept_axis_indices(n: int) -> list[int]:
    """Indices kept when an axis of length ``n`` is halved (spec section 4).

    For each group ``g`` of two, the later token ``min(2g+1, n-1)``: the odd indices, plus the last
    index when ``n`` is odd.
    """
    if n < 2:
        raise ScheduleError(f"an axis of length {n} cannot be halved (need length >= 2)")
    return [min(2 * g + 1, n - 1) for g in range(_halve(n))]


def newline_flag(newline) -> int:
    """``newline`` as 0 or 1: whether each row of an image grid ends with a newline token
    (LLaVA-NeXT / OneVision anyres). A bool, or the int 0 or 1 (an ``image_spans`` column)."""
    if isinstance(newline, bool):
        return int(newline)
    try:
        value = operator.index(newline)
    except TypeError:
        value = None
    if value not in (0, 1):
        raise ScheduleError(f"newline must be a bool (or 0 or 1), got {newline!r}")
    return value


def downsample_grid(grid: Grid, factor: int) -> Tuple[Grid, bool, bool]:
    """Apply one step to an ``(h, w)`` grid; returns ``((h', w'), rows_halved, cols_halved)``."""
    h, w = grid
    if factor == 4:
        rows, cols = True, True
    elif factor == 2:
        rows, cols = (h > w), not (h > w)  # tie halves the width
    else:
        raise ScheduleError(f"factor must be 2 or 4, got {factor}")
    if (rows and h < 2) or (cols and w < 2):
        raise ScheduleError(
            f"a {h}x{w} grid cannot be downsampled by factor {factor}: "
            f"it would halve a side of length 1"
        )
    return ((_halve(h) if rows else h), (_halve(w) if cols else w)), rows, cols


@dataclass(frozen=True)
class Step:
    """One downsampling step: before decoder layer ``layer``, by ``factor``."""

    layer: int
    factor: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.factor}"


@dataclass(frozen=True)
class StageInfo:
    """One stage of a validated schedule: layers ``[first_layer, end_layer)`` share one layout;
    ``stage`` is its number (0: the unmodified layout). ``grid`` is the image grid of the stage and
    ``tokens_per_image`` the tokens one image keeps in it: ``h * w``, or ``h * (w + 1)`` for a grid
    whose rows end with a newline token (``validate(..., newline=True)``)."""

    stage: int
    first_layer: int
    end_layer: int
    grid: Grid
    tokens_per_image: int

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer


@dataclass(frozen=True)
class Schedule:
    """A parsed ADSC schedule. ``Schedule.parse(text)``; ``str(schedule)`` gives the text back."""

    steps: Tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        limit = max_steps()
        if limit is not None and len(steps) > limit:
            raise ScheduleError(f"at most {limit} steps are supported, got {len(steps)}")
        prev = 0
        for i, st in enumerate(steps):
            if not isinstance(st, Step):
                raise ScheduleError(f"step {i} must be a Step, got {type(st).__name__}")
            if isinstance(st.layer, bool) or not isinstance(st.layer, int):
                raise ScheduleError(f"step {i}: layer must be an int, got {st.layer!r}")
            if st.layer < 1:
                raise ScheduleError(
                    f"step {i} ('{st}'): layer must be >= 1 (downsampling happens before a "
                    f"layer, and layer 0 sees the full sequence), got {st.layer}"
                )
            if st.layer > MAX_LAYER:
                raise ScheduleError(
                    f"step {i} ('{st}'): layer must be at most {MAX_LAYER} (9 digits, what the "
                    f"text form holds), got {st.layer}"
                )
            if isinstance(st.factor, bool) or not isinstance(st.factor, int):
                raise ScheduleError(f"step {i}: factor must be an int, got {st.factor!r}")
            if st.layer <= prev and i > 0:
                raise ScheduleError(
                    f"step {i} ('{st}'): layers must be strictly increasing, got {st.layer} "
                    f"after {prev}"
                )
            if st.factor not in (2, 4):
                raise ScheduleError(f"step {i} ('{st}'): factor must be 2 or 4, got {st.factor}")
            prev = st.layer

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """Parse ``"layer:factor,..."``; the empty (or all-blank) string is the empty schedule.

        Numbers are 1 to 9 ASCII digits; spaces and tabs may surround them. Anything else (other
        digits such as ``'٣'`` or ``'８'``, other whitespace) is a :class:`ScheduleError`.
        """
        if not isinstance(text, str):
            raise ScheduleError(f"a schedule string is expected, got {type(text).__name__}")
        if text.strip(" \t") == "":
            return cls(())
        steps = []
        for i, item in enumerate(text.split(",")):
            m = _ITEM.fullmatch(item)
            if m is None:
                raise ScheduleError(
                    f"bad schedule item {i} {item.strip(' ')!r} in {text!r}: expected "
                    f"'layer:factor' with two non-negative integers of at most 9 ASCII digits, "
                    f"e.g. '8:2,16:2,24:2'"
                )
            steps.append(Step(int(m.group(1)), int(m.group(2))))
        return cls(tuple(steps))

    @classmethod
    def coerce(cls, value: Union[None, str, "Schedule", Iterable[Tuple[int, int]]]) -> "Schedule":
        """Accept a Schedule, its text, None (empty) or ``[(layer, factor), ...]``."""
        if isinstance(value, Schedule):
            return value
        if value is None:
            return cls(())
        if isinstance(value, str):
            return cls.parse(value)
        try:
            # operator.index: ints (and numpy ints) only; int() would read '٣' or 8.5.
            return cls(tuple(Step(operator.index(layer), operator.index(factor))
                             for layer, factor in value))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ScheduleError):
                raise
            raise ScheduleError(
                f"a schedule must be a string, a Schedule or (layer, factor) pairs; got {value!r}"
            ) from None

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def layers(self) -> Tuple[int, ...]:
        return tuple(s.layer for s in self.steps)

    @property
    def factors(self) -> Tuple[int, ...]:
        return tuple(s.factor for s in self.steps)

    # ---- model-dependent views ----------------------------------------------------------------
    def grids(self, grid: Sequence[int]) -> list[Grid]:
        """The image grid of every stage, stage 0 (the original grid) first."""
        h, w = _check_grid(grid)
        out = [(h, w)]
        for st in self.steps:
            try:
                nxt, _, _ = downsample_grid(out[-1], st.factor)
            except ScheduleError as exc:
                raise ScheduleError(
                    f"schedule '{self}' does not fit a {h}x{w} image grid: at step '{st}' {exc}"
                ) from None
            out.append(nxt)
        return out

    def image_tokens(self, grid: Sequence[int], *, newline: bool = False) -> list[int]:
        """Tokens one image keeps at every stage, stage 0 first: ``h_s * w_s`` for its stage grids
        (:meth:`grids`), or ``h_s * (w_s + 1)`` when ``newline`` (each grid row followed by one
        newline token, kept with its row; the newline column is not a column of the grid, so the
        downsampling rule sees ``h x w``). Raises :class:`ScheduleError` when the schedule cannot
        downsample the grid (a side of length 1 to halve).

        ``Schedule.parse("1:2,2:2").image_tokens((3, 4), newline=True)`` is ``[15, 9, 6]``
        (3x4 -> 3x2 -> 2x2 grids, plus one newline per row).
        """
        nl = newline_flag(newline)
        return [h * (w + nl) for h, w in self.grids(grid)]

    def stage_lengths(self, num_tokens: int, grids: Sequence[Sequence[int]]) -> list[int]:
        """Tokens alive in every stage of a sequence of ``num_tokens`` tokens that holds images of
        ``grids``: one ``(h, w)`` per image, or ``(h, w, newline)`` for a grid whose rows each end
        with a newline token (:meth:`image_tokens`). The sequence's text tokens plus each image's
        tokens at the stage (spec section 4). Raises :class:`ScheduleError` for a grid the
        schedule cannot downsample."""
        per_grid = {}
        for g in grids:
            key = tuple(int(v) for v in g)
            if key not in per_grid:
                per_grid[key] = self.image_tokens(key[:2], newline=bool(key[2]) if len(key) > 2 else False)
        sizes = [per_grid[tuple(int(v) for v in g)] for g in grids]
        text = int(num_tokens) - sum(s[0] for s in sizes)
        if text < 0:
            raise ScheduleError(f"{num_tokens} tokens cannot hold images of {sum(s[0] for s in sizes)} tokens")
        return [text + sum(s[k] for s in sizes) for k in range(len(self.steps) + 1)]

    def stage_of_layer(self, layer: int) -> int:
        """The stage (0 = unmodified layout) that decoder layer ``layer`` runs in."""
        return sum(1 for st in self.steps if st.layer <= layer)

    def validate(self, num_layers: int, grid: Sequence[int] | None = None, *,
                 newline: bool = False) -> list[StageInfo]:
        """Check the schedule against a model; returns one :class:`StageInfo` per stage.

        ``grid`` (optional) is an image's ``(h, w)``; ``newline`` says its rows each end with a
        newline token, which the stages' ``tokens_per_image`` then count (:meth:`image_tokens`).
        Raises :class:`ScheduleError` if a layer is ``>= num_layers`` or a grid side would have to
        be halved below 1.
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ScheduleError(f"num_layers must be a positive int, got {num_layers!r}")
        for st in self.steps:
            if st.layer >= num_layers:
                raise ScheduleError(
                    f"schedule '{self}' does not fit a model with {num_layers} decoder layers: "
                    f"step '{st}' needs 1 <= layer < {num_layers}"
                )
        nl = newline_flag(newline)
        grids = self.grids(grid) if grid is not None else [(0, 0)] * (len(self.steps) + 1)
        bounds = [0, *self.layers, num_layers]
        return [
            StageInfo(i, bounds[i], bounds[i + 1], grids[i], grids[i][0] * (grids[i][1] + nl))
            for i in range(len(self.steps) + 1)
        ]


def _check_grid(grid: Sequence[int]) -> Grid:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ScheduleError(f"an image grid must be (height, width), got {grid!r}") from None
    if h < 1 or w < 1:
        raise ScheduleError(f"an image grid needs positive sides, got {h}x{w}")
    return h, w
