"""Notifications: rows on the user's shard, delivered live on `notifications:user:<id>`.

A notification is written in the same transaction as what it announces (an order
confirmation is written with its order), so a crash can never leave an order without its
confirmation; the live event is published after that commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.adapters.db.router import ShardRouter
from server.common.errors import NotFound
from server.domain.events import NotificationCreated, Publish, announce
from server.domain.orders import DEFAULT_PAGE, MAX_ID, check_page_size, decode_cursor, encode_cursor

_COLUMNS = "id, kind, title, body, created_at, read_at"


def notification_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    """The public shape `{id, kind, title, body, created_at, read_at}` of a row of
    `_COLUMNS`; the cable event carries the contract's subset (no `read_at`)."""
    created_at: datetime = row[4]
    read_at: datetime | None = row[5]
    return {
        "id": str(row[0]),
        "kind": row[1],
        "title": row[2],
        "body": row[3],
        "created_at": created_at.isoformat(),
        "read_at": read_at.isoformat() if read_at else None,
    }


async def insert_notification(
    cur: Any, user_id: int, kind: str, title: str, body: str
) -> dict[str, Any]:
    """Write a notification inside the caller's shard transaction; returns it."""
    await cur.execute(
        "INSERT INTO notifications (user_id, kind, title, body) VALUES (%s, %s, %s, %s) "
        f"RETURNING {_COLUMNS}",
        (user_id, kind, title, body),
    )
    return notification_dict(await cur.fetchone())


class NotificationService:
    """A user's notifications: list, mark read, and publish new ones."""

    def __init__(self, router: ShardRouter, publish: Publish | None = None) -> None:
        self.router = router
        self.publish = publish

    async def announce(self, user_id: int, notification: dict[str, Any]) -> None:
        """Publish a committed notification to the user's NotificationsChannel."""
        await announce(self.publish, NotificationCreated(user_id, notification))

    async def create(self, user_id: int, kind: str, title: str, body: str = "") -> dict[str, Any]:
        """Write a notification on its own and publish it."""
        async with self.router.write(user_id) as cur:
            notification = await insert_notification(cur, user_id, kind, title, body)
        await self.announce(user_id, notification)
        return notification

    async def newest_id(self, user_id: int) -> int:
        """The id of the user's newest notification (0: none), read from the primary: where a
        live follower starts, so it can ask for what it missed (`after`)."""
        async with self.router.read(user_id, fresh=True) as cur:
            await cur.execute(
                "SELECT coalesce(max(id), 0) FROM notifications WHERE user_id = %s", (user_id,)
            )
            (newest,) = await cur.fetchone()
        return int(newest)

    async def after(
        self, user_id: int, notification_id: int, limit: int = DEFAULT_PAGE
    ) -> list[dict[str, Any]]:
        """The user's notifications newer than `notification_id`, oldest first, at most
        `limit` (the newest of them), read from the primary."""
        async with self.router.read(user_id, fresh=True) as cur:
            await cur.execute(
                f"SELECT {_COLUMNS} FROM notifications WHERE user_id = %s AND id > %s "
                "ORDER BY id DESC LIMIT %s",
                (user_id, notification_id, limit),
            )
            rows = await cur.fetchall()
        return [notification_dict(row) for row in reversed(rows)]

    async def page(
        self, user_id: int, first: int = DEFAULT_PAGE, after: str | None = None
    ) -> dict[str, Any]:
        """`{items: [Notification], next_cursor, unread}`, newest first."""
        check_page_size(first)
        before_id = decode_cursor("notification", after)
        async with self.router.read(user_id) as cur:
            await cur.execute(
                f"SELECT {_COLUMNS} FROM notifications WHERE user_id = %s "
                "AND (%s::bigint IS NULL OR id < %s::bigint) ORDER BY id DESC LIMIT %s",
                (user_id, before_id, before_id, first + 1),
            )
            rows = await cur.fetchall()
            await cur.execute(
                "SELECT count(*) FROM notifications WHERE user_id = %s AND read_at IS NULL",
                (user_id,),
            )
            (unread,) = await cur.fetchone()
        page = rows[:first]
        next_cursor = encode_cursor("notification", int(page[-1][0])) if len(rows) > first else None
        return {
            "items": [notification_dict(row) for row in page],
            "next_cursor": next_cursor,
            "unread": int(unread),
        }

    async def mark_read(self, user_id: int, notification_id: int) -> dict[str, Any]:
        """Mark one of the user's notifications read (idempotent: the first time is kept)."""
        if not 1 <= notification_id <= MAX_ID:
            raise NotFound(f"no notification {notification_id}")
        async with self.router.write(user_id) as cur:
            await cur.execute(
                "UPDATE notifications SET read_at = COALESCE(read_at, now()) "
                f"WHERE id = %s AND user_id = %s RETURNING {_COLUMNS}",
                (notification_id, user_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"no notification {notification_id}", notification_id=str(notification_id)
            )
        return notification_dict(row)
