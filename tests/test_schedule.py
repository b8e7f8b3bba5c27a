"""Schedules (spec section 2) and the per-axis downsampling rule (spec section 4)."""

import pytest
from hypothesis import given, strategies as st

from adsc_ext import LLAVA15_DEFAULT, Schedule, ScheduleError
from adsc_ext.schedule import Step, downsample_grid, kept_axis_indices


def test_default_and_round_trip():
    assert LLAVA15_DEFAULT == "8:2,16:2,24:2"
    s = Schedule.parse(LLAVA15_DEFAULT)
    assert s.layers == (8, 16, 24) and s.factors == (2, 2, 2)
    assert str(s) == LLAVA15_DEFAULT
    assert Schedule.parse(" 1 : 4 , 3:2 ") == Schedule((Step(1, 4), Step(3, 2)))
    assert str(Schedule.parse("")) == "" and not Schedule.parse("")
    assert Schedule.coerce(None) == Schedule.parse("")
    assert Schedule.coerce([(8, 2), (16, 4)]) == Schedule.parse("8:2,16:4")
    assert Schedule.coerce(s) is s


def test_validate_llava15_stages():
    stages = Schedule.parse(LLAVA15_DEFAULT).validate(32, (24, 24))
    assert [st.grid for st in stages] == [(24, 24), (24, 12), (12, 12), (12, 6)]
    assert [st.tokens_per_image for st in stages] == [576, 288, 144, 72]
    assert [(st.first_layer, st.end_layer) for st in stages] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert Schedule.parse(LLAVA15_DEFAULT).stage_of_layer(7) == 0
    assert Schedule.parse(LLAVA15_DEFAULT).stage_of_layer(8) == 1
    assert Schedule.parse(LLAVA15_DEFAULT).stage_of_layer(31) == 3


def test_grids_odd_sides_and_factor_4():
    # 7x5: factor 2 halves the longer side (rows) -> 4x5; then cols (tie-breaker only on equality)
    assert Schedule.parse("1:2,2:2,3:4").grids((7, 5)) == [(7, 5), (4, 5), (4, 3), (2, 2)]
    # tie halves the width
    assert downsample_grid((4, 4), 2) == ((4, 2), False, True)
    assert downsample_grid((3, 1), 2) == ((2, 1), True, False)


@pytest.mark.parametrize(
    "n, kept", [(2, [1]), (3, [1, 2]), (4, [1, 3]), (5, [1, 3, 4]), (8, [1, 3, 5, 7])]
)
def test_kept_axis_indices(n, kept):
    assert kept_axis_indices(n) == kept


@pytest.mark.parametrize(
    "text, match",
    [
        ("8:3", "factor must be 2 or 4, got 3"),
        ("0:2", "layer must be >= 1"),
        ("8:2,8:2", "strictly increasing, got 8 after 8"),
        ("16:2,8:2", "strictly increasing"),
        ("8", "expected 'layer:factor'"),
        ("a:2", "bad schedule item 0 'a:2'"),
        ("8:2,", "bad schedule item 1"),
        ("-1:2", "expected 'layer:factor'"),
        ("8:2;16:2", "expected 'layer:factor'"),
        (",".join(f"{i}:2" for i in range(1, 18)), "at most 16 steps"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule.parse(text)


def test_validate_errors():
    with pytest.raises(ScheduleError, match="32 decoder layers.*1 <= layer < 32"):
        Schedule.parse("8:2,32:2").validate(32, (24, 24))
    with pytest.raises(ScheduleError, match="halve a side of length 1"):
        Schedule.parse("1:2,2:2").validate(8, (1, 2))
    with pytest.raises(ScheduleError, match="cannot be downsampled by factor 4"):
        Schedule.parse("1:4").validate(8, (1, 4))
    with pytest.raises(ScheduleError, match="num_layers must be a positive int"):
        Schedule.parse("1:2").validate(0)
    with pytest.raises(ScheduleError, match="positive sides"):
        Schedule.parse("1:2").grids((0, 3))
    with pytest.raises(ScheduleError, match="schedule string is expected"):
        Schedule.parse(8)
    with pytest.raises(ScheduleError, match="must be a string, a Schedule or"):
        Schedule.coerce(42)


steps = st.lists(st.tuples(st.integers(1, 60), st.sampled_from([2, 4])), max_size=6)


@given(steps)
def test_round_trip_property(pairs):
    layers = sorted({layer for layer, _ in pairs})
    factors = [f for _, f in pairs][: len(layers)]
    text = ",".join(f"{l}:{f}" for l, f in zip(layers, factors))
    s = Schedule.parse(text)
    assert str(s) == text and Schedule.parse(str(s)) == s


@given(st.integers(1, 40), st.integers(1, 40), steps)
def test_grids_match_kept_indices(h, w, pairs):
    """The grid progression agrees with the per-axis rule it is derived from."""
    layers = sorted({layer for layer, _ in pairs})
    s = Schedule(tuple(Step(l, f) for l, (_, f) in zip(layers, pairs)))
    try:
        grids = s.grids((h, w))
    except ScheduleError:
        return
    rows, cols = list(range(h)), list(range(w))
    for step, (gh, gw) in zip(s.steps, grids[1:]):
        _, hr, hc = downsample_grid((len(rows), len(cols)), step.factor)
        rows = [rows[i] for i in kept_axis_indices(len(rows))] if hr else rows
        cols = [cols[i] for i in kept_axis_indices(len(cols))] if hc else cols
        assert (len(rows), len(cols)) == (gh, gw)


# ---- the Python and C parsers agree (issue 14 D7/D12, issue 10 item 4) ----------------------------
@pytest.mark.parametrize(
    "text",
    ["\u0661:\u0662",  # Arabic-Indic digits: str.isdigit() is True, int() parses them
     "\uff18:2",  # full-width 8
     "1:\u00b2",  # superscript two: isdigit() is True but int() fails
     "1234567890:2",  # ten digits: the C parser reads at most nine
     "0000000008:2",
     "8:2\n", "\n8:2", "8:\u00a02",  # whitespace other than spaces and tabs
     "8:2\x00"],
)
def test_parse_takes_ascii_digits_only(text):
    with pytest.raises(ScheduleError, match="expected 'layer:factor'"):
        Schedule.parse(text)


def test_parse_accepts_what_the_c_parser_accepts():
    assert Schedule.parse(" \t8 : 2 ,\t16:2 ") == Schedule.parse("8:2,16:2")
    assert Schedule.parse("999999999:2").layers == (999999999,)
    assert Schedule.parse(" \t ") == Schedule(())
    with pytest.raises(ScheduleError, match="layer must be at most 999999999"):
        Schedule([Step(1000000000, 2)])
    with pytest.raises(ScheduleError, match="must be a string, a Schedule or"):
        Schedule.coerce([("\u0663", 2)])  # int() would read a 3
    with pytest.raises(ScheduleError, match="must be a string, a Schedule or"):
        Schedule.coerce([(8.5, 2)])


def _c_parser():
    import ctypes
    from pathlib import Path

    import adsc_ext

    try:
        lib_path = Path(adsc_ext.cmake_prefix_path()) / "lib" / "libadsc.so"
    except FileNotFoundError:
        pytest.skip("this install of adsc_ext has no C/C++ SDK (libadsc.so)")
    lib = ctypes.CDLL(str(lib_path))

    from adsc_ext.schedule import max_steps

    n = max_steps()  # ADSC_MAX_STEPS, from the compiled core

    class CSchedule(ctypes.Structure):  # adsc_schedule of adsc.h
        _fields_ = [("num_steps", ctypes.c_int32), ("layers", ctypes.c_int32 * n),
                    ("factors", ctypes.c_int32 * n)]

    lib.adsc_schedule_parse.argtypes = [ctypes.c_char_p, ctypes.POINTER(CSchedule)]

    def parse(text: str):
        out = CSchedule()
        if lib.adsc_schedule_parse(text.encode("utf-8"), ctypes.byref(out)) != 0:
            return None
        return tuple(zip(out.layers[: out.num_steps], out.factors[: out.num_steps]))

    return parse


_PIECES = ["0", "1", "2", "3", "4", "8", "9", "16", "999999999", "1234567890", "00", ":", ",",
           " ", "\t", "\n", "\r", "\x0b", "\xa0", "-", "+", "_", "\uff18", "\u0661", "\u00b2",
           "\u0663", "x", "\u2028"]


@given(st.lists(st.sampled_from(_PIECES), max_size=24).map("".join))
def test_python_and_c_parsers_agree(text):
    c_result = _c_parser()(text)
    try:
        py_result = tuple((s.layer, s.factor) for s in Schedule.parse(text).steps)
    except ScheduleError:
        py_result = None
    assert py_result == c_result, text


@given(st.lists(st.tuples(st.integers(1, 10**9), st.sampled_from([2, 4])), max_size=20))
def test_python_and_c_parsers_agree_on_well_formed_texts(pairs):
    text = ",".join(f"{layer}:{factor}" for layer, factor in pairs)
    c_result = _c_parser()(text)
    try:
        py_result = tuple((s.layer, s.factor) for s in Schedule.parse(text).steps)
    except ScheduleError:
        py_result = None
    assert py_result == c_result, text


# ---- grids whose rows end with a newline token (LLaVA-NeXT / OneVision anyres) -------------------
def test_image_tokens_with_and_without_newlines():
    s = Schedule.parse("1:2,2:2")
    assert s.image_tokens((3, 4)) == [12, 6, 4]               # 3x4 -> 3x2 -> 2x2
    assert s.image_tokens((3, 4), newline=True) == [15, 9, 6]  # + one newline per row
    assert Schedule.parse("8:2,16:2,24:2").image_tokens((24, 24)) == [576, 288, 144, 72]
    # the newline column is not a column of the grid: a 3x2 grid halves its rows (h > w)
    assert Schedule.parse("1:2").image_tokens((3, 2), newline=True) == [9, 6]
    assert Schedule.parse("1:4").image_tokens((5, 7), newline=1) == [40, 15]
    assert Schedule().image_tokens((2, 1), newline=True) == [4]
    stages = s.validate(4, (3, 4), newline=True)
    assert [st.tokens_per_image for st in stages] == [15, 9, 6]
    assert [st.grid for st in stages] == [(3, 4), (3, 2), (2, 2)]
    assert [st.tokens_per_image for st in s.validate(4, (3, 4))] == [12, 6, 4]


def test_image_tokens_errors():
    with pytest.raises(ScheduleError, match="cannot be downsampled by factor 2: it would halve a "
                                            "side of length 1"):
        Schedule.parse("1:2,2:2").image_tokens((2, 1), newline=True)
    for bad in (2, -1, 0.5, "yes", None):
        with pytest.raises(ScheduleError, match=r"newline must be a bool \(or 0 or 1\), got"):
            Schedule.parse("1:2").image_tokens((2, 2), newline=bad)
        with pytest.raises(ScheduleError, match="newline must be a bool"):
            Schedule.parse("1:2").validate(4, (2, 2), newline=bad)


@given(st.integers(1, 12), st.integers(1, 12), st.booleans(), steps)
def test_image_tokens_count_the_reference_rule(h, w, newline, pairs):
    """The counts equal the tokens the reference keeps (adsc_ext.reference.kept_image_indices)."""
    from adsc_ext.reference import kept_image_indices

    layers = sorted({layer for layer, _ in pairs})
    s = Schedule(tuple(Step(l, f) for l, (_, f) in zip(layers, pairs)))
    try:
        counts = s.image_tokens((h, w), newline=newline)
    except ScheduleError:
        with pytest.raises(ScheduleError):
            kept_image_indices((h, w), s, newline=newline)
        return
    kept = kept_image_indices((h, w), s, newline=newline)
    assert counts == [len(k) for k in kept]
    for k in kept if newline else ():  # a kept row keeps its newline, whatever its columns
        rows = {i // (w + 1) for i in k}
        assert all(r * (w + 1) + w in k for r in rows)
        per_row = [sum(1 for i in k if i // (w + 1) == r) for r in rows]
        assert len(set(per_row)) <= 1  # still a grid: every kept row keeps the same columns


def test_stage_lengths_count_text_and_each_images_grid():
    """The one stage-length rule (the engine's pools, the model spec, adsc plan): text tokens plus
    every image's tokens at the stage, each image on its own grid, newline grids included."""
    s = Schedule.parse("1:2,2:2")
    assert s.stage_lengths(40, [(4, 4), (4, 4)]) == [40, 8 + 16, 8 + 8]
    assert s.stage_lengths(20, [(3, 4, 1)]) == [20, 5 + 9, 5 + 6]  # 3x4 + a newline per row
    assert s.stage_lengths(7, []) == [7, 7, 7] and Schedule.parse("").stage_lengths(9, [(2, 2)]) == [9]
    with pytest.raises(ScheduleError, match="cannot hold images"):
        s.stage_lengths(10, [(4, 4)])
    with pytest.raises(ScheduleError, match="cannot be downsampled"):
        Schedule.parse("1:4,2:4").stage_lengths(10, [(2, 2)])
