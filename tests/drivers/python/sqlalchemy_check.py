"""SQLAlchemy 2 ORM (over psycopg 3) through the router: a mapped class,
sessions that commit and roll back, add_all batches across shards, queries by
tenant, nested transactions (savepoints) across shards, and IntegrityError
with its SQLSTATE.
Usage: sqlalchemy_check.py ROUTER_URL TENANT_A TENANT_B"""

import datetime
import decimal
import uuid

import common
from common import check, check_row

try:
    import sqlalchemy
    from sqlalchemy import BigInteger, Integer, LargeBinary, Numeric, String, create_engine, func, select, update
    from sqlalchemy.dialects.postgresql import JSONB, UUID
    from sqlalchemy.exc import DBAPIError, IntegrityError
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
    from sqlalchemy.types import DateTime
except ImportError as e:
    common.missing("SQLAlchemy", e)

url, a, b = common.args()
print(f"driver: SQLAlchemy {sqlalchemy.__version__} (postgresql+psycopg)")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str] = mapped_column(String)
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2))
    flag: Mapped[bool]
    data: Mapped[bytes] = mapped_column(LargeBinary)
    ts: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    uid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    score: Mapped[float]
    doc: Mapped[dict] = mapped_column(JSONB)

    def values(self):
        return (self.tenant_id, self.id, self.note, self.amount, self.flag, self.data, self.ts, self.uid,
                self.score, self.doc)


def item(t, i):
    return Item(**dict(zip(common.COLUMNS.split(", "), common.row(t, i))))


def expect_sqlstate(code, fn, what, kind=DBAPIError):
    try:
        fn()
    except kind as e:
        got = getattr(e.orig, "sqlstate", None)
        check(got == code, f"{what}: SQLSTATE {got} ({e}), expected {code}")
        return e
    common.fail(f"{what}: no {kind.__name__}, expected SQLSTATE {code}")


engine = create_engine(url.replace("postgres://", "postgresql+psycopg://", 1))
with engine.connect() as c:
    check(c.execute(sqlalchemy.text("SELECT 1")).scalar() == 1, "SELECT 1")

with Session(engine) as s:
    # One unit of work, rows of both shards, one commit (two-phase on the router).
    s.add(item(a, 1))
    s.add(item(b, 1))
    s.commit()
    for t in (a, b):
        got = s.get(Item, (t, 1), populate_existing=True)
        check_row(got.values(), t, 1, "session.get")
    s.commit()

    # Rolled back: none of it stays.
    s.add_all([item(a, 2), item(b, 2)])
    s.flush()
    s.rollback()
    s.add_all([item(a, 3), item(b, 3)])
    s.commit()
    check(s.scalar(select(func.count()).select_from(Item).where(Item.id == 2)) == 0, "rolled-back rows are visible")

    # A batch of objects across both shards: the ORM sends executemany
    # ("insertmanyvalues" without RETURNING for a table with a client-given key).
    s.add_all([item(a, 10), item(b, 10), item(a, 11), item(b, 11)])
    s.commit()
    # A batch whose last object is a duplicate: IntegrityError, nothing stays.
    s.add_all([item(a, 20), item(b, 20), item(b, 21)])
    s.flush()
    s.add(item(a, 1))
    expect_sqlstate("23505", s.commit, "a duplicate in the unit of work", IntegrityError)
    s.rollback()

    # An ORM UPDATE of one tenant's row, and a refused one that would move rows.
    s.execute(update(Item).where(Item.tenant_id == a, Item.id == 3).values(note=common.note(a, 3)))
    s.commit()
    expect_sqlstate(
        "0A000",
        lambda: s.execute(update(Item).where(Item.tenant_id == a).values(tenant_id=b)),
        "moving a row",
    )
    s.rollback()

    # A read of every shard may start a session's transaction, and runs in
    # one bound to a shard too (that shard reads inside the transaction).
    rows = s.scalars(select(Item).order_by(Item.tenant_id, Item.id)).all()
    got = [(r.tenant_id, r.id) for r in rows]
    want = common.expected_ids(a, b, [1, 3, 10, 11])
    check(got == want, f"rows through the router: {got}, expected {want}")
    for r in rows:
        check_row(r.values(), r.tenant_id, r.id, "select(Item)")
    by_tenant = s.scalars(select(Item.id).where(Item.tenant_id == b).order_by(Item.id)).all()
    check(by_tenant == [1, 3, 10, 11], f"tenant {b}'s ids: {by_tenant}")
    n = s.execute(select(func.count()).select_from(Item)).scalar_one()
    check(n == 8, f"a read of every shard in a transaction bound to a shard: {n}, expected 8")
    s.rollback()
    total = s.execute(select(Item.tenant_id, func.count()).group_by(Item.tenant_id).order_by(Item.tenant_id)).all()
    check([tuple(r) for r in total] == [(min(a, b), 4), (max(a, b), 4)], f"count by tenant: {total}")

    s.rollback()

    # Nested transactions (SAVEPOINT) in a transaction on both shards: the
    # shard reached inside the savepoint has it too, so rolling back to it
    # undoes that shard's rows; the outer commit keeps the rest.
    s.add(item(a, 30))
    s.flush()
    nested = s.begin_nested()
    s.add(item(b, 32))
    s.flush()
    nested.rollback()
    s.add(item(b, 30))
    with s.begin_nested():
        s.add_all([item(a, 31), item(b, 31)])
    s.commit()
    got = s.execute(select(Item.tenant_id, Item.id).where(Item.id >= 30).order_by(Item.tenant_id, Item.id)).all()
    want = sorted([(a, 30), (a, 31), (b, 30), (b, 31)])
    check([tuple(r) for r in got] == want, f"rows after nested transactions: {got}, expected {want}")

engine.dispose()
print("ok")
