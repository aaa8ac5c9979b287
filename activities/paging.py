"""Keyset paging by (time, id): a page after the last row of the previous one, stable while
rows are added (an offset would shift)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, or_


def after_key(stmt, at_column, id_column, after: tuple[datetime, str] | None):
    """`stmt` ordered by (time, id), from the row after `after` (None: from the first)."""
    if after is not None:
        stmt = stmt.where(or_(at_column > after[0], and_(at_column == after[0], id_column > after[1])))
    return stmt.order_by(at_column, id_column)
