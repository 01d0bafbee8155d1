"""The user state machine. Pure: no I/O, no clock, no ports.

`TRANSITIONS` is the one table that decides, for every state a user can be in and every step a use
case can take, where the user ends up or why the step is refused (the reason a client sees). The
use cases (domain.py) ask `decide()` and never compare states themselves:

    ACTIVE <-> SUSPENDED        an administrator's UpdateUser
    ACTIVE | SUSPENDED -> DELETED   DeleteUser (soft delete: the row stays for the orders)
    DELETED is final: nothing changes any more; deleting it again is a no-op that returns it
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from shop_mesh.services.common.errors import FailedPrecondition


class UserState(Enum):
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    DELETED = "DELETED"


class UserStep(Enum):
    """What a use case does to a user."""

    EDIT = "EDIT"  # change the email or the display name (the state stays)
    ACTIVATE = "ACTIVATE"
    SUSPEND = "SUSPEND"
    DELETE = "DELETE"


@dataclass(frozen=True)
class Rule:
    target: UserState | None  # the state after the step; None: refused
    reason: str = ""  # why it is refused (ErrorInfo reason)


_A, _S, _D = UserState.ACTIVE, UserState.SUSPENDED, UserState.DELETED
_FINAL = Rule(None, "USER_DELETED")

TRANSITIONS: Mapping[tuple[UserState, UserStep], Rule] = MappingProxyType(
    {
        (_A, UserStep.EDIT): Rule(_A),
        (_A, UserStep.ACTIVATE): Rule(_A),  # already there: a no-op, not an error
        (_A, UserStep.SUSPEND): Rule(_S),
        (_A, UserStep.DELETE): Rule(_D),
        (_S, UserStep.EDIT): Rule(_S),
        (_S, UserStep.ACTIVATE): Rule(_A),
        (_S, UserStep.SUSPEND): Rule(_S),
        (_S, UserStep.DELETE): Rule(_D),
        (_D, UserStep.EDIT): _FINAL,
        (_D, UserStep.ACTIVATE): _FINAL,
        (_D, UserStep.SUSPEND): _FINAL,
        # The caller's intent already holds, so a client that lost its request_id is not punished.
        (_D, UserStep.DELETE): Rule(_D),
    }
)

# The step that UpdateUser's `state` field asks for; DELETED is DeleteUser's (not in here).
STEP_TO: Mapping[UserState, UserStep] = MappingProxyType(
    {UserState.ACTIVE: UserStep.ACTIVATE, UserState.SUSPENDED: UserStep.SUSPEND}
)


def decide(user_id: str, state: UserState, step: UserStep) -> UserState:
    """The state after `step`, or FailedPrecondition with the table's reason."""
    rule = TRANSITIONS[(state, step)]
    if rule.target is None:
        raise FailedPrecondition(
            f"user {user_id} is {state.value.lower()} and cannot change",
            reason=rule.reason,
            metadata={"user_id": user_id},
        )
    return rule.target
