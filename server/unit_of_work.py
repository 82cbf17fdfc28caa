"""A unit of work: one transaction, committed or rolled back as a whole, and what it wrote
announced on the broker only once it is committed.

Domain services never publish themselves: a runner told of a command it cannot read yet
(or ever, after a rollback) would act on nothing. They `announce` on their session, and the
owner of the transaction (a GraphQL mutation, a panel action) publishes after the commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from server.broker import SECRETS_TOPIC, Broker
from server.errors import ErrorCode, InvalidInput, UserError
from server.known_secrets import take_secrets_changed

Announcement = Callable[[Broker], None]
ANNOUNCEMENTS = "corral.announcements"  # a key of `AsyncSession.info`


def announce(session: AsyncSession, topic: str, message: Any) -> None:
    """Publish `message` on `topic` once this unit of work commits (never if it rolls back)."""
    _pending(session).append(lambda broker: broker.publish(topic, message))


def announce_status(session: AsyncSession, command_id: int, status: str) -> None:
    """Announce a command's new status once this unit of work commits."""
    _pending(session).append(lambda broker: broker.publish_status(command_id, status))


def _pending(session: AsyncSession) -> list[Announcement]:
    pending: list[Announcement] = session.info.setdefault(ANNOUNCEMENTS, [])
    return pending


def _take_announcements(session: AsyncSession) -> list[Announcement]:
    return list(session.info.pop(ANNOUNCEMENTS, ()))


@asynccontextmanager
async def unit_of_work(session: AsyncSession, broker: Broker) -> AsyncIterator[AsyncSession]:
    """Commit on success, then publish what was announced (a changed secret too); roll back
    and forget the announcements otherwise (a constraint race: a TAKEN InvalidInput)."""
    try:
        yield session
        await session.commit()
    except InvalidInput:
        await session.rollback()
        raise
    except IntegrityError as exc:
        await session.rollback()
        raise InvalidInput([UserError((), _integrity_message(exc), ErrorCode.TAKEN)]) from exc
    except BaseException:
        await session.rollback()
        raise
    finally:
        changed = take_secrets_changed(session)
        announcements = _take_announcements(session)
    if changed:  # the runner's redactor must know the new secret now
        broker.publish(SECRETS_TOPIC, None)
    for publish in announcements:
        publish(broker)


def _integrity_message(exc: IntegrityError) -> str:
    text = str(exc.orig).lower()
    if "unique" in text:
        return "that conflicts with an existing record (a name already in use?)"
    return "that refers to a record that no longer exists or is still in use"
