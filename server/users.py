"""Users: accounts spread over the shards, with globally allocated ids.

A new account takes its id and claims its email in the catalog's `user_directory` (one
sequence, one unique index for every shard), then its row is written on shard
`id % shard_count`. Should the shard write fail, the directory claim is removed again, so a
failed sign-up leaves the email free.
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2.errors
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError

from server.adapters.db.router import ShardRouter
from server.common.errors import Conflict, InvalidInput, NotFound, Unauthenticated

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
MAX_USER_ID = 2**63 - 1
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024


@functools.cache
def _dummy_hash() -> str:
    """A real argon2id hash nobody's password matches: unknown emails cost a verification too."""
    return PasswordHasher().hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class User:
    """An account as the rest of the product sees it (never the password hash)."""

    id: int
    email: str
    name: str
    is_admin: bool
    created_at: datetime

    def to_dict(self) -> dict[str, object]:
        """The public JSON shape of a user."""
        return {
            "id": str(self.id),
            "email": self.email,
            "name": self.name,
            "is_admin": self.is_admin,
            "created_at": self.created_at.isoformat(),
        }


def normalise_email(email: str) -> str:
    """The canonical (lower-case, trimmed) form of `email`; raises if it is not one."""
    canonical = email.strip().lower()
    if len(canonical) > 254 or not _EMAIL.match(canonical):
        raise InvalidInput("email is not a valid address", field="email")
    return canonical


def check_password_rules(password: str) -> None:
    """Refuse passwords that are too short or absurdly long (hashing cost is bounded)."""
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidInput(
            f"password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters",
            field="password",
        )


class UserService:
    """Creates and finds accounts across the catalog directory and the user shards."""

    def __init__(self, router: ShardRouter, hasher: PasswordHasher | None = None) -> None:
        self.router = router
        self.hasher = hasher or PasswordHasher()

    async def hash_password(self, password: str) -> str:
        """argon2id hash of `password`, computed off the event loop (it is memory-hard)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.hasher.hash, password)

    async def create_user(
        self, email: str, password: str, name: str = "", is_admin: bool = False
    ) -> User:
        """Create an account; `Conflict` when the email is taken."""
        email = normalise_email(email)
        check_password_rules(password)
        if len(name) > 200:
            raise InvalidInput("name must be at most 200 characters", field="name")
        password_hash = await self.hash_password(password)
        user_id = await self._claim_email(email)
        try:
            return await self._insert_user(user_id, email, name, password_hash, is_admin)
        except BaseException:
            await self._release_email(email, user_id)
            raise

    async def authenticate(self, email: str, password: str) -> User:
        """The account for `email` if `password` is right; `Unauthenticated` otherwise (one
        message for unknown email and wrong password, so neither can be probed)."""
        try:
            email = normalise_email(email)
        except InvalidInput:
            raise Unauthenticated("email or password is wrong") from None
        async with self.router.catalog_read() as cur:
            await cur.execute("SELECT user_id FROM user_directory WHERE email = %s", (email,))
            row = await cur.fetchone()
        stored = None
        if row is not None:
            user_id = int(row[0])
            async with self.router.read(user_id, fresh=True) as cur:
                await cur.execute(
                    "SELECT id, email, name, is_admin, created_at, password_hash "
                    "FROM users WHERE id = %s",
                    (user_id,),
                )
                stored = await cur.fetchone()
        # Verify against a dummy hash when the account is unknown: equal time either way.
        password_hash = stored[5] if stored else None
        if not await self._verify(password_hash, password) or stored is None:
            raise Unauthenticated("email or password is wrong")
        return User(
            id=stored[0], email=stored[1], name=stored[2], is_admin=stored[3], created_at=stored[4]
        )

    async def get(self, user_id: int) -> User:
        """The account `user_id` (`NotFound` if it does not exist)."""
        async with self.router.read(user_id) as cur:
            await cur.execute(
                "SELECT id, email, name, is_admin, created_at FROM users WHERE id = %s",
                (user_id,),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no user {user_id}")
        return User(id=row[0], email=row[1], name=row[2], is_admin=row[3], created_at=row[4])

    async def get_many(self, user_ids: Iterable[int]) -> dict[int, User]:
        """The accounts among `user_ids` that exist, by id: one statement per shard."""
        by_shard: dict[str, list[int]] = {}
        for user_id in dict.fromkeys(user_ids):
            if 0 < user_id <= MAX_USER_ID:
                by_shard.setdefault(self.router.shard_name(user_id), []).append(user_id)

        async def read(ids: list[int]) -> list[Any]:
            async with self.router.read(ids[0]) as cur:
                await cur.execute(
                    "SELECT id, email, name, is_admin, created_at FROM users WHERE id = ANY(%s)",
                    (ids,),
                )
                rows: list[Any] = await cur.fetchall()
            return rows

        found: dict[int, User] = {}
        for rows in await asyncio.gather(*(read(ids) for ids in by_shard.values())):
            for row in rows:
                found[int(row[0])] = User(
                    id=row[0], email=row[1], name=row[2], is_admin=row[3], created_at=row[4]
                )
        return found

    async def _verify(self, password_hash: str | None, password: str) -> bool:
        """argon2 verification off the loop; `None` verifies against the dummy hash (made,
        the first time, in the same worker thread: hashing is as costly as verifying)."""

        def verify() -> bool:
            try:
                return bool(self.hasher.verify(password_hash or _dummy_hash(), password))
            except (VerifyMismatchError, InvalidHashError):
                return False

        return await asyncio.get_running_loop().run_in_executor(None, verify)

    async def _claim_email(self, email: str) -> int:
        async with self.router.catalog_write() as cur:
            try:
                await cur.execute(
                    "INSERT INTO user_directory (email) VALUES (%s) RETURNING user_id", (email,)
                )
            except psycopg2.errors.UniqueViolation:
                raise Conflict("an account with this email exists", field="email") from None
            row = await cur.fetchone()
            return int(row[0])

    async def _release_email(self, email: str, user_id: int) -> None:
        async with self.router.catalog_write() as cur:
            await cur.execute(
                "DELETE FROM user_directory WHERE email = %s AND user_id = %s", (email, user_id)
            )

    async def _insert_user(
        self, user_id: int, email: str, name: str, password_hash: str, is_admin: bool
    ) -> User:
        async with self.router.write(user_id) as cur:
            await cur.execute(
                """
                WITH u AS (
                    INSERT INTO users (id, email, name, password_hash, is_admin)
                    VALUES (%s, %s, %s, %s, %s)
                    RETURNING id, email, name, is_admin, created_at
                ), c AS (INSERT INTO carts (user_id) SELECT id FROM u)
                SELECT * FROM u
                """,
                (user_id, email, name, password_hash, is_admin),
            )
            row = await cur.fetchone()
        return User(id=row[0], email=row[1], name=row[2], is_admin=row[3], created_at=row[4])
