"""`db/phases.py`: a read-only phase sees one snapshot, whatever commits while it reads."""

from __future__ import annotations

from sqlalchemy import func, select

from phivault.auth.models import User
from phivault.auth.service import user_cipher
from phivault.db.phases import reads_only
from phivault.privacy import erasure
from phivault.runtime import Runtime
from tests.factories import make_user


async def test_a_read_phase_sees_one_snapshot(runtime: Runtime) -> None:
    async with runtime.unit_of_work() as session, reads_only(session):
        before = (await session.execute(select(func.count()).select_from(User))).scalar_one()
        await make_user(runtime)  # another unit of work, committed meanwhile
        after = (await session.execute(select(func.count()).select_from(User))).scalar_one()
    assert after == before
    async with runtime.sessions() as session:
        now = (await session.execute(select(func.count()).select_from(User))).scalar_one()
    assert now == before + 1


async def test_a_password_check_racing_an_erasure_never_sees_half_of_it(runtime: Runtime) -> None:
    """What a run of the suite once hit (a 500 among parallel erasures): the check read the
    account, the erasure committed, and the check's next statement found the email's data key
    destroyed; at READ COMMITTED that was a false `INTEGRITY_FAILURE`. In one snapshot the
    check sees the account whole, as it was; the write that follows locks the row and reads it
    again (`lock_active_user`), and finds it erased."""
    patient = await make_user(runtime)
    async with runtime.unit_of_work() as session, reads_only(session):
        user = await session.get(User, patient.id)
        assert user is not None and user.email is not None
        async with runtime.unit_of_work() as other:
            await erasure.erase(other, runtime.envelope, patient.id)
        cipher = await user_cipher(session, runtime.envelope, user)
        assert cipher.open("email", user.email) == patient.email
    async with runtime.sessions() as session:
        erased = await session.get(User, patient.id)
    assert erased is not None and erased.status == "deleted" and erased.email is None
