"""UserService wire messages <-> domain values, and request validation (field paths as in the proto)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from shop.user.v1 import user_pb2

from services.common.convert import enum_value, timestamp
from services.common.errors import Violations
from services.common.ids import is_valid_id
from services.common.pagination import PageRequest, make_page_token, parse_page
from services.common.validation import check_request_id, check_resource_id
from services.user.domain import (
    ID_PREFIX,
    MAX_DISPLAY_NAME_LENGTH,
    MAX_EMAIL_LENGTH,
    NewUser,
    User,
    UserChanges,
    UserPage,
    UserState,
    normalize_display_name,
    normalize_email,
)

_TO_PROTO: dict[UserState, user_pb2.UserState.ValueType] = {
    UserState.ACTIVE: user_pb2.USER_STATE_ACTIVE,
    UserState.SUSPENDED: user_pb2.USER_STATE_SUSPENDED,
    UserState.DELETED: user_pb2.USER_STATE_DELETED,
}
_FROM_PROTO: dict[int, UserState] = {number: state for state, number in _TO_PROTO.items()}

UPDATABLE_PATHS = ("display_name", "email", "state")

# The WHATWG (HTML "type=email") address syntax, plus a dot in the domain: what a shop can mail to.
# ASCII only; internationalized addresses are out of scope (see docs/decisions.md).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
_MAX_LOCAL_PART = 64


@dataclass(frozen=True)
class ListQuery:
    state: UserState | None
    page: PageRequest
    filter_key: str


def user_to_proto(user: User) -> user_pb2.User:
    return user_pb2.User(
        user_id=user.user_id,
        email=user.email,
        display_name=user.display_name,
        state=_TO_PROTO[user.state],
        create_time=timestamp(user.create_time),
        update_time=timestamp(user.update_time),
    )


def _check_email(v: Violations, field: str, raw: str) -> str:
    email = normalize_email(raw)
    if not email:
        v.add(field, "required")
    elif len(email) > MAX_EMAIL_LENGTH:
        v.add(field, f"must be at most {MAX_EMAIL_LENGTH} characters")
    elif not _EMAIL.fullmatch(email) or len(email.partition("@")[0]) > _MAX_LOCAL_PART:
        v.add(field, "not a valid email address (expected name@example.com)")
    return email


def _check_display_name(v: Violations, field: str, raw: str) -> str:
    name = normalize_display_name(raw)
    if not name:
        v.add(field, "required: 1 to 200 characters")
    elif len(name) > MAX_DISPLAY_NAME_LENGTH:
        v.add(field, f"must be at most {MAX_DISPLAY_NAME_LENGTH} characters")
    elif any(unicodedata.category(ch) == "Cc" for ch in name):
        v.add(field, "must not contain control characters")
    return name


def create_user_request(request: user_pb2.CreateUserRequest) -> tuple[str, NewUser]:
    v = Violations()
    check_request_id(v, request.request_id)
    email = _check_email(v, "email", request.email)
    display_name = _check_display_name(v, "display_name", request.display_name)
    v.raise_if_any()
    return request.request_id, NewUser(email=email, display_name=display_name)


def get_user_request(request: user_pb2.GetUserRequest) -> str:
    v = Violations()
    check_resource_id(v, request.user_id, "user_id", ID_PREFIX)
    v.raise_if_any()
    return request.user_id


def list_users_request(request: user_pb2.ListUsersRequest) -> ListQuery:
    v = Violations()
    number = enum_value(v, "state", request.state, set(_FROM_PROTO), allow_unspecified=True)
    # The token is bound to the filter: a token from another state's listing is rejected.
    filter_key = f"state={request.state}"
    page = parse_page(v, request.page_size, request.page_token, filter_key)
    if page.after_key is not None and not is_valid_id(page.after_key, ID_PREFIX):
        v.add("page_token", "invalid or made for a different query")
    v.raise_if_any()
    state = None if not number else _FROM_PROTO[number]
    return ListQuery(state=state, page=page, filter_key=filter_key)


def list_users_response(page: UserPage, filter_key: str) -> user_pb2.ListUsersResponse:
    token = "" if page.last_id is None else make_page_token(page.last_id, filter_key)
    return user_pb2.ListUsersResponse(users=[user_to_proto(u) for u in page.users], next_page_token=token)


def update_user_request(request: user_pb2.UpdateUserRequest) -> tuple[str, UserChanges]:
    v = Violations()
    check_request_id(v, request.request_id)
    check_resource_id(v, request.user.user_id, "user.user_id", ID_PREFIX)
    paths = list(request.update_mask.paths)
    if not paths:
        v.add("update_mask", "required: name the fields to change (" + ", ".join(UPDATABLE_PATHS) + ")")
    for i, path in enumerate(paths):
        if path not in UPDATABLE_PATHS:
            v.add(
                f"update_mask.paths[{i}]", f"cannot update {path!r}; allowed: " + ", ".join(UPDATABLE_PATHS)
            )
    email = display_name = None
    state: UserState | None = None
    if "email" in paths:
        email = _check_email(v, "user.email", request.user.email)
    if "display_name" in paths:
        display_name = _check_display_name(v, "user.display_name", request.user.display_name)
    if "state" in paths:
        number = enum_value(v, "user.state", request.user.state, set(_FROM_PROTO), allow_unspecified=False)
        if number == user_pb2.USER_STATE_DELETED:
            v.add("user.state", "USER_STATE_DELETED is set by DeleteUser; use ACTIVE or SUSPENDED")
        elif number:
            state = _FROM_PROTO[number]
    v.raise_if_any()
    changes = UserChanges(user_id=request.user.user_id, email=email, display_name=display_name, state=state)
    return request.request_id, changes


def delete_user_request(request: user_pb2.DeleteUserRequest) -> tuple[str, str]:
    v = Violations()
    check_request_id(v, request.request_id)
    check_resource_id(v, request.user_id, "user_id", ID_PREFIX)
    v.raise_if_any()
    return request.request_id, request.user_id
