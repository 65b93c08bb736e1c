"""A wake that names a run passes over that run (and runs waiting for room or due), not every
active run: with 1,000 active runs one agent report must not cost 1,000 passes."""

from __future__ import annotations

from dstack.core.models.runs import JobStatus, RunStatus
from tests.server.pipeline.test_loop import World


async def test_a_named_wake_passes_over_that_run_and_the_waiting_ones(db):
    world = World(db)
    await world.setup()
    try:
        await world.add_instance(cpus=2)
        running = [await world.add_run() for _ in range(2)]  # cpu: 1 each: the host is full
        await world.until("both running", lambda: _all(world, running, RunStatus.RUNNING))
        waiting = await world.add_run(configuration={"retry": {"on_events": ["no-capacity"]}})
        await world.pipeline.process()  # a full pass: `waiting` stays submitted
        assert (await world.jobs(waiting))[0].status == JobStatus.SUBMITTED.value

        seen: list[str] = []
        real = world.pipeline._process_run_isolated

        async def spy(run_id: str) -> float | None:
            seen.append(run_id)
            return await real(run_id)

        world.pipeline._process_run_isolated = spy  # type: ignore[method-assign]
        world.pipeline.wake(running[0])
        await world.pipeline._process_some()
        assert sorted(seen) == sorted([running[0], waiting])  # not running[1]

        seen.clear()
        await world.pipeline._process_some()  # nothing named, nothing due: only the waiting run
        assert seen == [waiting]

        seen.clear()
        await world.pipeline.process()  # a plain wake's pass: every active run
        assert sorted(seen) == sorted([*running, waiting])
    finally:
        await world.close()


async def _all(world: World, run_ids: list[str], status: RunStatus) -> bool:
    return all([await world.run_status(r, status) for r in run_ids])
