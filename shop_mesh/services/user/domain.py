"""Users: entities and the business rules of creating, changing and deleting them.

No protobuf, gRPC or SQLAlchemy here. Which state changes are allowed is model.py's table (`decide`).
Persistence goes through the `UserRepository` protocol (implemented in repository.py) inside the
units of the common `UnitOfWork` port, and GetUser through the `UserLookup` port (whose SQL adapter
serves it with the database's fastest read).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from shop_mesh.services.common.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied
from shop_mesh.services.common.idempotency import Codec, IdempotentCommands
from shop_mesh.services.common.ids import new_id
from shop_mesh.services.common.pagination import Page, PageRequest, page_of
from shop_mesh.services.common.principal import SERVICE, Principal
from shop_mesh.services.common.unit_of_work import IdempotencyKeys, Session, UnitOfWork
from shop_mesh.services.user.model import STEP_TO, UserStep, decide
from shop_mesh.services.user.model import UserState as UserState

ID_PREFIX = "usr"
MAX_EMAIL_LENGTH = 254
MAX_DISPLAY_NAME_LENGTH = 200


@dataclass(frozen=True)
class User:
    user_id: str
    email: str  # lower-cased
    display_name: str  # trimmed
    state: UserState
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class NewUser:
    email: str
    display_name: str


@dataclass(frozen=True)
class UserChanges:
    """The fields an update sets; None means 'not in the update mask'."""

    user_id: str
    email: str | None = None
    display_name: str | None = None
    state: UserState | None = None


class UserRepository(Protocol):
    def get(self, user_id: str, *, for_update: bool = False) -> User | None: ...

    def email_owner(self, email: str) -> str | None:
        """The id of the live (not deleted) user holding `email`, if any."""
        ...

    def insert(self, user: User) -> None:
        """Raises AlreadyExists(EMAIL_TAKEN) if a concurrent transaction took the email first."""
        ...

    def save(self, user: User) -> None:
        """Raises AlreadyExists(EMAIL_TAKEN) if a concurrent transaction took the email first."""
        ...

    def list_page(self, state: UserState | None, after_id: str | None, limit: int) -> Sequence[User]:
        """Up to `limit` users after `after_id`, in id order."""
        ...


class UserLookup(Protocol):
    """GetUser's read, outside any unit: the hot path (order-service checks every order's user)."""

    async def get(self, user_id: str) -> User | None: ...


def normalize_email(raw: str) -> str:
    return raw.strip().lower()


def normalize_display_name(raw: str) -> str:
    return raw.strip()


def user_to_json(user: User) -> str:
    """The snapshot stored with an idempotency key: a repeat returns exactly this."""
    return json.dumps(
        {
            "user_id": user.user_id,
            "email": user.email,
            "display_name": user.display_name,
            "state": user.state.value,
            "create_time": user.create_time.isoformat(),
            "update_time": user.update_time.isoformat(),
        },
        separators=(",", ":"),
    )


def user_from_json(raw: str) -> User:
    data: dict[str, Any] = json.loads(raw)
    return User(
        user_id=data["user_id"],
        email=data["email"],
        display_name=data["display_name"],
        state=UserState(data["state"]),
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
    )


USER_CODEC = Codec(user_to_json, user_from_json)


def _now() -> datetime:
    return datetime.now(UTC)


class UserService:
    """The user use cases. Each mutation claims its request_id in the transaction of its effect."""

    def __init__(
        self,
        db: UnitOfWork[Session],
        repository: Callable[[Session], UserRepository],
        idempotency: IdempotencyKeys,
        *,
        clock: Callable[[], datetime] = _now,
        lookup: UserLookup | None = None,
    ):
        """`lookup`, when given, serves GetUser; otherwise a read unit and the repository do."""
        self._db = db
        self._lookup = lookup
        self._repository = repository
        self._commands = IdempotentCommands(db, idempotency)
        self._clock = clock

    async def get_user(self, user_id: str, *, principal: Principal = SERVICE) -> User:
        # A customer sees only their own record; another's looks missing (ids cannot be probed).
        principal.check_owner(user_id, _not_found)
        if self._lookup is not None:
            user = await self._lookup.get(user_id)
        else:
            user = await self._db.read(lambda session: self._repository(session).get(user_id))
        if user is None:
            raise _not_found(user_id)
        return user

    async def list_users(
        self, state: UserState | None, page: PageRequest, *, principal: Principal = SERVICE
    ) -> Page[User]:
        principal.require_privileged("listing users")
        rows = await self._db.read(
            lambda session: self._repository(session).list_page(state, page.after_key, page.fetch_size)
        )
        return page_of(rows, page, _user_id)

    async def create_user(self, request_id: str, new: NewUser) -> User:
        payload = {"email": new.email, "display_name": new.display_name}

        def create(session: Session) -> User:
            users = self._repository(session)
            if users.email_owner(new.email) is not None:
                raise email_taken(new.email)
            now = self._clock()
            user = User(
                user_id=new_id(ID_PREFIX),
                email=new.email,
                display_name=new.display_name,
                state=UserState.ACTIVE,
                create_time=now,
                update_time=now,
            )
            users.insert(user)
            return user

        return (await self._commands.run("CreateUser", request_id, payload, USER_CODEC, create)).result

    async def update_user(
        self, request_id: str, changes: UserChanges, *, principal: Principal = SERVICE
    ) -> User:
        """Apply the masked fields; a repeat of request_id returns the stored first result.

        A customer changes only their own email and name: the state (suspension) is an operator's.
        """
        principal.check_owner(changes.user_id, _not_found)
        if changes.state is not None and not principal.privileged:
            raise PermissionDenied("only an administrator changes a user's state", reason="ADMIN_ONLY")
        if changes.state is UserState.DELETED:
            # mapping.py rejects this with a field violation; guard the rule for other callers too.
            raise FailedPrecondition("use DeleteUser to delete a user", reason="USE_DELETE_USER")
        payload = {
            "user_id": changes.user_id,
            "email": changes.email,
            "display_name": changes.display_name,
            "state": None if changes.state is None else changes.state.value,
        }

        def update(session: Session) -> User:
            users = self._repository(session)
            current = users.get(changes.user_id, for_update=True)
            if current is None:
                raise _not_found(changes.user_id)
            state = decide(current.user_id, current.state, UserStep.EDIT)  # a deleted user is final
            if changes.state is not None:
                state = decide(current.user_id, current.state, STEP_TO[changes.state])
            updated = replace(
                current,
                email=current.email if changes.email is None else changes.email,
                display_name=current.display_name if changes.display_name is None else changes.display_name,
                state=state,
            )
            if updated.email != current.email:
                owner = users.email_owner(updated.email)
                if owner is not None and owner != current.user_id:
                    raise email_taken(updated.email)
            if updated != current:
                # A no-op update keeps update_time: nothing changed.
                updated = replace(updated, update_time=self._clock())
                users.save(updated)
            return updated

        return (await self._commands.run("UpdateUser", request_id, payload, USER_CODEC, update)).result

    async def delete_user(self, request_id: str, user_id: str, *, principal: Principal = SERVICE) -> User:
        """Soft delete (state DELETED; the row stays for the orders that reference it). A customer
        may delete their own account only.

        Deleting an already-deleted user under a new request_id succeeds and returns it unchanged:
        the caller's intent already holds, so a client that lost its request_id is not punished.
        """
        principal.check_owner(user_id, _not_found)

        def delete(session: Session) -> User:
            users = self._repository(session)
            current = users.get(user_id, for_update=True)
            if current is None:
                raise _not_found(user_id)
            state = decide(user_id, current.state, UserStep.DELETE)
            if state is current.state:
                return current  # deleting a deleted user: the no-op of the table
            deleted = replace(current, state=state, update_time=self._clock())
            users.save(deleted)
            return deleted

        payload = {"user_id": user_id}
        return (await self._commands.run("DeleteUser", request_id, payload, USER_CODEC, delete)).result


def _user_id(user: User) -> str:
    return user.user_id


def _not_found(user_id: str) -> NotFound:
    return NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND", metadata={"user_id": user_id})


def email_taken(email: str) -> AlreadyExists:
    return AlreadyExists(
        "a user with this email already exists", reason="EMAIL_TAKEN", metadata={"email": email}
    )
