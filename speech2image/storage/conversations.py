"""Conversations: a caller's thread of turns, each a new picture or an edit of the last one."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from .base import Base, aware, new_id, utcnow

__all__ = ["ConversationRecord", "ConversationStore", "TurnRecord"]


class ConversationRecord(Base):
    """One conversation and its owner."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TurnRecord(Base):
    """One turn: what was said, what the service decided and the images it made."""

    __tablename__ = "conversation_turns"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # "speech" or "text"
    transcript: Mapped[str] = mapped_column(Text)
    decision: Mapped[str] = mapped_column(String(16))  # "new" or "edit"
    operation: Mapped[str] = mapped_column(String(16))  # new, add, remove, replace, style, setting
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    changes: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(BigInteger)
    strength: Mapped[float | None] = mapped_column(Float)
    image_ids: Mapped[list[str]] = mapped_column(JSON)
    undone: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def as_dict(self) -> dict[str, Any]:
        """The turn as the API shows it (the images are added by the view)."""
        return {
            "id": self.id,
            "position": self.position,
            "source": self.source,
            "transcript": self.transcript,
            "decision": self.decision,
            "operation": self.operation,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "changes": self.changes,
            "seed": self.seed,
            "strength": self.strength,
            "image_ids": self.image_ids,
            "created_at": aware(self.created_at).isoformat(),
        }


class ConversationStore:
    """Conversation rows in the history database."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def create(self, owner: str) -> ConversationRecord:
        """A new, empty conversation of ``owner``."""
        record = ConversationRecord(id=new_id(), owner=owner, created_at=utcnow())
        with self._sessions.begin() as session:
            session.add(record)
        return record

    def get(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        """The owner's conversation, else None."""
        with self._sessions() as session:
            return session.scalar(
                select(ConversationRecord).where(
                    ConversationRecord.id == conversation_id, ConversationRecord.owner == owner
                )
            )

    def turns(self, conversation_id: str) -> list[TurnRecord]:
        """The turns that stand (not undone), oldest first."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(TurnRecord)
                    .where(TurnRecord.conversation_id == conversation_id, ~TurnRecord.undone)
                    .order_by(TurnRecord.position)
                )
            )

    def add_turn(self, conversation_id: str, **fields: Any) -> TurnRecord:
        """Append a turn after the last one (undone turns keep their positions)."""
        with self._sessions.begin() as session:
            last = session.scalar(
                select(func.max(TurnRecord.position)).where(
                    TurnRecord.conversation_id == conversation_id
                )
            )
            record = TurnRecord(
                id=new_id(),
                conversation_id=conversation_id,
                position=(last or 0) + 1,
                created_at=utcnow(),
                undone=False,
                **fields,
            )
            session.add(record)
        return record

    def undo(self, conversation_id: str) -> TurnRecord | None:
        """Mark the last standing turn undone; returns it (None: nothing to undo)."""
        standing = self.turns(conversation_id)
        if not standing:
            return None
        last = standing[-1]
        with self._sessions.begin() as session:
            session.execute(update(TurnRecord).where(TurnRecord.id == last.id).values(undone=True))
        return last
