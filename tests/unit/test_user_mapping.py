"""UserService request rules (user.proto, checked by shop_mesh.services.common.validation) and proto <->
domain
conversion, without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from shop.user.v1 import user_pb2

from shop_mesh.services.common.errors import InvalidArgument
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.pagination import Page, make_page_token
from shop_mesh.services.common.validation import check_request
from shop_mesh.services.user import mapping
from shop_mesh.services.user.domain import NewUser, User, UserChanges, UserState


def violations(exc: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {v.field for v in exc.value.violations}


def create(request: user_pb2.CreateUserRequest) -> tuple[str, NewUser]:
    """What the server does: the proto's rules first, then the mapping."""
    check_request(request)
    return mapping.create_user_request(request)


def test_create_request_normalizes_email_and_name() -> None:
    request_id, new = create(
        user_pb2.CreateUserRequest(
            request_id="r-1", email="  Mixed.Case+tag@Example.ORG ", display_name=" Ada "
        )
    )
    assert request_id == "r-1"
    assert new == NewUser(email="mixed.case+tag@example.org", display_name="Ada")


@pytest.mark.parametrize(
    "email",
    [
        "a@b.co",
        "first.last@sub.example.com",
        "o'brien+shop@example.ie",
        "x" * 64 + "@example.com",
        "a@" + ".".join(["b" * 60] * 4) + ".com",  # 250 characters in all
    ],
)
def test_valid_emails(email: str) -> None:
    _, new = create(user_pb2.CreateUserRequest(request_id="r", email=email, display_name="A"))
    assert new.email == email.lower()


@pytest.mark.parametrize(
    "email",
    [
        "plain",
        "@example.com",
        "a@",
        "a@b",
        "a@@b.com",
        ".a@b.com",
        "a.@b.com",
        "a..b@b.com",
        "a b@b.com",
        "a@-b.com",
        "a@b-.com",
        "a@b..com",
        "a@b\n.com",
        "ä@b.com",
        "a@bü.com",
        "x" * 65 + "@example.com",
        "a@" + "b" * 250 + ".com",
        "a@" + "b" * 64 + ".com",  # a DNS label is at most 63 characters
    ],
)
def test_invalid_emails_name_the_field(email: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        create(user_pb2.CreateUserRequest(request_id="r", email=email, display_name="A"))
    assert violations(err) == {"email"}


def test_email_longer_than_254_after_trimming_is_rejected_by_length() -> None:
    email = "a@" + ".".join(["b" * 63] * 4) + ".com"
    assert len(email) > 254
    with pytest.raises(InvalidArgument) as err:
        create(user_pb2.CreateUserRequest(request_id="r", email=email, display_name="A"))
    assert "at most 254" in err.value.violations[0].description


def test_update_request_takes_only_masked_fields() -> None:
    user_id = new_id("usr")
    request = user_pb2.UpdateUserRequest(
        request_id="u",
        user=user_pb2.User(
            user_id=user_id,
            email="IGNORED@example.com",
            display_name=" New ",
            state=user_pb2.USER_STATE_SUSPENDED,
        ),
        update_mask=FieldMask(paths=["display_name", "state"]),
    )
    assert mapping.update_user_request(request) == (
        "u",
        UserChanges(user_id=user_id, display_name="New", state=UserState.SUSPENDED),
    )


@pytest.mark.parametrize(
    ("paths", "user", "expected"),
    [
        ([], {}, {"update_mask"}),
        (["email", "user.email", "*"], {"email": "a@b.co"}, {"update_mask"}),
        # Rules across fields (the mask and the value) still name the field to fix.
        (["email"], {}, {"user.email"}),
        (["display_name"], {"email": "not-an-address"}, {"user.display_name", "user.email"}),
        (["state"], {"state": user_pb2.USER_STATE_DELETED}, {"user.state"}),
        (["state"], {"state": user_pb2.USER_STATE_UNSPECIFIED}, {"user.state"}),
        (["state"], {"state": 17}, {"user.state"}),
    ],
)
def test_update_request_violations(paths: list[str], user: dict[str, object], expected: set[str]) -> None:
    request = user_pb2.UpdateUserRequest(
        request_id="u",
        user=user_pb2.User(user_id=new_id("usr"), **user),  # type: ignore[arg-type]
        update_mask=FieldMask(paths=paths),
    )
    with pytest.raises(InvalidArgument) as err:
        check_request(request)
    assert violations(err) == expected


def test_list_request_state_filter_and_token_binding() -> None:
    query = mapping.list_users_request(user_pb2.ListUsersRequest(state=user_pb2.USER_STATE_SUSPENDED))
    assert (query.state, query.page.size, query.page.after_key) == (UserState.SUSPENDED, 50, None)
    assert mapping.list_users_request(user_pb2.ListUsersRequest()).state is None

    last = new_id("usr")
    token = make_page_token(last, query.filter_key)
    again = mapping.list_users_request(
        user_pb2.ListUsersRequest(state=user_pb2.USER_STATE_SUSPENDED, page_token=token, page_size=900)
    )
    assert (again.page.after_key, again.page.size) == (last, 500)
    with pytest.raises(InvalidArgument) as err:
        mapping.list_users_request(user_pb2.ListUsersRequest(page_token=token))
    assert violations(err) == {"page_token"}
    with pytest.raises(InvalidArgument) as err:
        check_request(user_pb2.ListUsersRequest(state=5, page_size=-3))  # type: ignore[arg-type]
    assert violations(err) == {"state", "page_size"}


def test_user_to_proto_and_list_response() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    user = User(new_id("usr"), "a@b.co", "A", UserState.DELETED, when, when)
    message = mapping.user_to_proto(user)
    assert message.state == user_pb2.USER_STATE_DELETED
    assert message.create_time.ToDatetime(UTC) == when
    last_page = mapping.list_users_response(Page([user], next_key=None), "state=0")
    assert last_page.next_page_token == ""
    more = mapping.list_users_response(Page([user], next_key=user.user_id), "state=0")
    assert more.next_page_token == make_page_token(user.user_id, "state=0")


def test_every_domain_state_has_a_wire_value() -> None:
    for state in UserState:
        assert (
            mapping.user_to_proto(
                User(new_id("usr"), "a@b.co", "A", state, datetime.now(UTC), datetime.now(UTC))
            ).state
            != user_pb2.USER_STATE_UNSPECIFIED
        )
