"""The global repair budget (core/budget.py): what it allows and what it says is left."""

from __future__ import annotations

import pytest

from nodemedic.core.budget import RepairBudget

pytestmark = pytest.mark.unit


def test_remaining_counts_down_and_back_as_repairs_leave_the_window() -> None:
    budget = RepairBudget(repairs=2, window=3600)
    assert budget.remaining(0) == 2
    budget.spend(0)
    budget.spend(10)
    assert budget.remaining(10) == 0
    assert not budget.allow(3599)
    assert budget.remaining(3600) == 1, "the first repair left the window"
    assert budget.allow(3600)
    assert budget.remaining(3611) == 2


def test_remaining_changes_nothing_and_agrees_with_allow() -> None:
    budget = RepairBudget(repairs=3, window=100, spent=[30.0, 120.0, 130.0])
    assert budget.remaining(140) == 1
    assert budget.spent == [30.0, 120.0, 130.0], "a reader forgets nothing"
    assert budget.allow(140)
    assert budget.remaining(140) == 1


def test_a_clock_set_back_keeps_what_was_spent() -> None:
    budget = RepairBudget(repairs=2, window=100, spent=[500.0])
    assert budget.remaining(400) == 1, "a repair 'after now' is still spent"


def test_more_spent_than_allowed_is_none_left_never_negative() -> None:
    budget = RepairBudget(repairs=1, window=100, spent=[1.0, 2.0, 3.0])
    assert budget.remaining(4) == 0
