"""The one parser of numeric DSTACK_* variables: defaults, bounds, and errors that name the variable."""

import math

import pytest

from dstack.core.env_numbers import number, whole_number


def test_unset_or_empty_gives_the_default() -> None:
    assert whole_number({}, "X", 7) == 7
    assert whole_number({"X": ""}, "X", 7) == 7
    assert number({}, "Y", 2, 0, 10) == 2.0


def test_values_within_bounds_are_taken() -> None:
    assert whole_number({"X": "42"}, "X", 7) == 42
    assert number({"Y": "0.25"}, "Y", 2, 0, 10) == 0.25


@pytest.mark.parametrize(
    ("raw", "words"),
    [("64MB", "whole number of bytes, not '64MB'"), ("0", "at least 1, not 0"), ("1.5", "whole number")],
)
def test_bad_whole_numbers_name_the_variable(raw: str, words: str) -> None:
    with pytest.raises(ValueError, match="DSTACK_X") as e:
        whole_number({"DSTACK_X": raw}, "DSTACK_X", 7, unit="bytes")
    assert words in str(e.value)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("soon", "number of seconds, not 'soon'"),
        ("-1", "between 0 and 10 seconds"),
        ("11", "between 0 and 10 seconds"),
        ("nan", "between"),
        ("inf", "between"),
    ],
)
def test_bad_numbers_name_the_variable(raw: str, words: str) -> None:
    with pytest.raises(ValueError, match="DSTACK_Y") as e:
        number({"DSTACK_Y": raw}, "DSTACK_Y", 2, 0, 10, unit="seconds")
    assert words in str(e.value)


def test_a_long_value_is_cut_in_the_message() -> None:
    with pytest.raises(ValueError) as e:
        number({"Y": "x" * 500}, "Y", 2, 0, 10)
    assert len(str(e.value)) < 120
    assert not math.isnan(number({"Y": "10"}, "Y", 2, 0, 10))
