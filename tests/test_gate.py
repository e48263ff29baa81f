"""The daemon's write gate, in-process under trio: quiesce drains the writes
that are running, holds new ones while the copy point is taken, then lets
them go on in order."""

from __future__ import annotations

import pytest
import trio

from evscrypt.daemon.gate import WriteGate


def test_quiesce_drains_running_writes_and_holds_new_ones():
    log = []

    async def write(gate, name, duration, started=None):
        async with gate:
            log.append(f"{name} start")
            if started is not None:
                started.set()
            await trio.sleep(duration)
            log.append(f"{name} end")

    async def main():
        gate = WriteGate()
        async with trio.open_nursery() as n:
            running = trio.Event()
            n.start_soon(write, gate, "w1", 0.05, running)
            await running.wait()
            async with gate.quiesce():
                log.append("copy start")
                assert gate.active == 0 and gate.closed
                n.start_soon(write, gate, "w2", 0)
                await trio.sleep(0.05)  # w2 must not start while the copy point is held
                log.append("copy end")
            assert not gate.closed
        assert gate.active == 0

    trio.run(main)
    assert log == ["w1 start", "w1 end", "copy start", "copy end", "w2 start", "w2 end"]


def test_open_gate_costs_no_checkpoint_and_nested_quiesce_is_a_bug():
    async def main():
        gate = WriteGate()
        with trio.CancelScope() as scope:
            scope.cancel()
            async with gate:  # no checkpoint on the fast path: a cancelled scope does not fire
                assert gate.active == 1
        assert gate.active == 0
        async with gate.quiesce():
            with pytest.raises(RuntimeError):
                async with gate.quiesce():
                    pass
        assert not gate.closed

    trio.run(main)
