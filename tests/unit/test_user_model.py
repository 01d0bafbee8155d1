"""The user state machine as a table: every (state, step) pair, allowed or refused with its reason."""

from __future__ import annotations

import itertools

import pytest

from shop_mesh.services.common.errors import FailedPrecondition
from shop_mesh.services.user.model import STEP_TO, TRANSITIONS, UserState, UserStep, decide

A, S, D = UserState.ACTIVE, UserState.SUSPENDED, UserState.DELETED
ALLOWED = {
    (A, UserStep.EDIT): A,
    (A, UserStep.ACTIVATE): A,
    (A, UserStep.SUSPEND): S,
    (A, UserStep.DELETE): D,
    (S, UserStep.EDIT): S,
    (S, UserStep.ACTIVATE): A,
    (S, UserStep.SUSPEND): S,
    (S, UserStep.DELETE): D,
    (D, UserStep.DELETE): D,  # the documented no-op
}
REFUSED = {(D, UserStep.EDIT), (D, UserStep.ACTIVATE), (D, UserStep.SUSPEND)}


def test_the_table_has_every_pair_once() -> None:
    every = set(itertools.product(UserState, UserStep))
    assert set(TRANSITIONS) == every == set(ALLOWED) | REFUSED


@pytest.mark.parametrize(("state", "step"), sorted(ALLOWED, key=str), ids=str)
def test_allowed_pairs_lead_where_the_table_says(state: UserState, step: UserStep) -> None:
    assert decide("usr_1", state, step) is ALLOWED[(state, step)]


@pytest.mark.parametrize(("state", "step"), sorted(REFUSED, key=str), ids=str)
def test_a_deleted_user_is_final(state: UserState, step: UserStep) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        decide("usr_1", state, step)
    assert refused.value.reason == "USER_DELETED"
    assert refused.value.metadata == {"user_id": "usr_1"}
    assert "usr_1 is deleted" in refused.value.message


def test_update_user_asks_for_a_state_by_its_step_and_never_for_deleted() -> None:
    assert {state: decide("usr_1", S, step) for state, step in STEP_TO.items()} == {A: A, S: S}
    assert D not in STEP_TO  # DeleteUser's business (UpdateUser refuses it with USE_DELETE_USER)
