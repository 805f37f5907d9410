"""EngineLoop: commands between steps, a failed step stops it loudly, nothing waits forever."""

import threading
from types import SimpleNamespace

import pytest

from engine.engine_loop import EngineLoop, EngineStopped


class FakeEngine:
    """Has work while `work` > 0; a step raises once `fail_at` steps have run."""

    def __init__(self, work=0, fail_at=None, in_step=None, release=None):
        self.work, self.fail_at, self.steps = work, fail_at, 0
        self.in_step, self.release = in_step, release  # events: a step has begun / may go on
        self.scheduler = SimpleNamespace(stats=SimpleNamespace(steps=0))
        self.checked = 0

    def has_unfinished_requests(self):
        return self.work > 0

    def step(self, on_layer=None):
        if self.in_step is not None:
            self.in_step.set()
            self.release.wait(5)
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("device lost")
        self.steps += 1
        self.scheduler.stats.steps += 1
        self.work -= 1
        return [f"out{self.steps}"]

    def check_invariants(self):
        self.checked += 1


def until(predicate, seconds: float = 5.0) -> None:
    """Wait for what the engine thread does on its own (a command would count as activity)."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        threading.Event().wait(0.01)


def test_commands_run_between_steps_and_invariants_are_checked_once_quiet():
    engine, outputs = FakeEngine(work=3), []
    loop = EngineLoop(engine, outputs.extend, idle_check_after=0.05)
    loop.start()
    assert loop.call(lambda x: x * 2, 21).result(5) == 42
    until(lambda: engine.checked)  # once the loop has been quiet (no step, no command) for 0.05 s
    loop.stop()
    assert outputs == ["out1", "out2", "out3"] and engine.checked == 1 and not loop.alive


def test_the_idle_time_check_waits_for_a_quiet_spell():
    """Not as the engine goes idle: that is when a prefill's KV has just been queued for its sender."""
    engine, outputs = FakeEngine(work=3), []
    loop = EngineLoop(engine, outputs.extend, idle_check_after=600)
    loop.start()
    until(lambda: len(outputs) == 3)  # commands run before each step: wait for the steps to be done
    assert loop.call(lambda: (list(outputs), engine.checked)).result(5) == (["out1", "out2", "out3"], 0)
    loop.stop()


def test_a_failed_step_stops_the_loop_and_fails_every_waiter():
    in_step, release, stopped = threading.Event(), threading.Event(), threading.Event()
    errors = []
    engine = FakeEngine(work=5, fail_at=0, in_step=in_step, release=release)
    loop = EngineLoop(engine, lambda outs: None, on_stop=lambda e: (errors.append(e), stopped.set()))
    loop.start()
    assert in_step.wait(5)
    waiting = [loop.call(lambda: "never") for _ in range(3)]  # queued while the step runs
    release.set()  # the step fails
    assert stopped.wait(5) and isinstance(errors[0], RuntimeError) and isinstance(loop.error, RuntimeError)
    for future in waiting:
        with pytest.raises(EngineStopped, match="device lost"):
            future.result(5)
    with pytest.raises(EngineStopped):  # after the loop is gone, a call fails at once instead of hanging
        loop.call(lambda: "late").result(5)


def test_health_carries_the_age_of_the_step_now_running():
    """Read off the engine thread: a hung step shows in it while the worker's actor still answers."""
    in_step, release = threading.Event(), threading.Event()
    loop = EngineLoop(FakeEngine(work=1, in_step=in_step, release=release), lambda outs: None)
    assert loop.health == {"alive": False, "step_seconds": 0.0}
    loop.start()
    assert in_step.wait(5)
    first = loop.health["step_seconds"]
    threading.Event().wait(0.05)
    during = loop.health
    release.set()
    until(lambda: loop.health["step_seconds"] == 0.0)
    after = loop.health
    loop.stop()
    assert during["alive"] and during["step_seconds"] >= first + 0.05
    assert after == {"alive": True, "step_seconds": 0.0}
