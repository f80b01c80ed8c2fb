"""The record of a repair under way (repair.json), and finishing a repair nodemedic died in."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from nodemedic.actions import socket_dir
from nodemedic.actions.socket_dir import finish_quarantines
from nodemedic.events import PathChanged, PathKind, UnitChanged
from nodemedic.executor import Executor
from nodemedic.policy.actions import RemoveSocketDirParams
from nodemedic.report import RecordKind
from nodemedic.store import INTENT_FILE, IntentStore, RepairIntent

from .fakes import FakeClock
from .test_runner import Harness

pytestmark = pytest.mark.unit
RULE = "socket-path-is-directory"
STAMP = "20261201T120000Z-000001"


def intent(step: str, index: int, stopped: tuple[str, ...] = ("containerd.service",)) -> RepairIntent:
    return RepairIntent(incident="abc123", rule=RULE, started_at=1.7e9, index=index, step=step,
                        stopped=stopped, applied=("stop-unit",), at=1.7e9)  # fmt: skip


def restarted(h: Harness, state: Path) -> Executor:
    """nodemedic started again after a SIGKILL: a new runner on the same state directory, and D-Bus
    resynchronising containerd's state (inactive: the stop of the cut-off repair)."""
    runner = Executor(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, None, IntentStore(state))
    runner.handle(UnitChanged("containerd.service", "inactive", "dead"))
    return runner


def test_a_record_round_trips_and_is_cleared(tmp_path: Path) -> None:
    store = IntentStore(tmp_path)
    store.save(intent("remove-socket-dir", 1))
    assert store.load() == intent("remove-socket-dir", 1)
    store.clear()
    assert store.load() is None
    store.clear()  # twice: nothing there is fine


def damaged(**change: object) -> str:
    return json.dumps({**json.loads(intent("stop-unit", 0).to_json()), **change})


@pytest.mark.parametrize(
    "text",
    ["{", '{"version": 2}', "[]", damaged(stopped="x"), damaged(index=True), damaged(index=-1),
     damaged(rule=None), damaged(at=10**400), damaged(started_at=float("nan"))],
    ids=["truncated", "version", "not-a-table", "stopped-not-a-list", "index-bool", "index-negative",
         "rule-missing", "time-past-float", "time-nan"],
)  # fmt: skip
def test_a_damaged_record_is_moved_aside_never_acted_on(tmp_path: Path, text: str) -> None:
    (tmp_path / INTENT_FILE).write_text(text)
    store = IntentStore(tmp_path)
    assert store.load() is None
    assert store.corrupt
    assert Path(store.corrupt).read_text() == text
    assert not (tmp_path / INTENT_FILE).exists()


async def test_the_record_says_what_is_under_way_before_each_change(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness()
    state = tmp_path / "state"
    runner = Executor(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, None, IntentStore(state))
    runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    seen: list[tuple[str, list[str]]] = []
    began: set[float] = set()

    def look(verb: str) -> None:
        data = json.loads((state / INTENT_FILE).read_text())
        seen.append((data["step"], data["stopped"]))
        began.add(data["started_at"])

    stop, start = h.units.stop, h.units.start

    async def stopping(unit: str, timeout: float) -> None:
        look("stop")
        await stop(unit, timeout)

    async def starting(unit: str, timeout: float) -> None:
        look("start")
        await start(unit, timeout)

    h.units.stop, h.units.start = stopping, starting  # type: ignore[method-assign]
    h.sock.mkdir()
    runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))
    await h.settle()
    # a unit being stopped or started is down if nodemedic dies then: the record names it
    assert seen == [("stop-unit", ["containerd.service"]), ("start-unit", ["containerd.service"])]
    assert len(began) == 1, "one repair, one start time"
    assert not (state / INTENT_FILE).exists(), "cleared once the repair concluded"
    assert [r.fields["OUTCOME"] for r in h.sink.of(RecordKind.OUTCOME)] == ["repaired"]


async def test_a_repair_cut_off_after_the_stop_is_finished_at_start(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness()
    state = tmp_path / "state"
    IntentStore(state).save(intent("remove-socket-dir", 1))
    h.sock.mkdir()  # killed before the directory was touched
    h.units.active["containerd.service"] = "inactive"
    runner = restarted(h, state)
    assert "containerd.service" not in runner.stopped_by_others, "our stop, not an operator's"
    runner.recover()
    runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))  # waits, then nothing to do
    await h.settle()
    assert h.units.calls == [("start", "containerd.service"), ("restart", "kubelet.service")]
    assert h.sock.is_socket()
    assert not (state / INTENT_FILE).exists()
    [interrupted] = [r for r in h.sink.of(RecordKind.ERROR) if r.fields["OUTCOME"] == "interrupted"]
    assert interrupted.fields["INCIDENT"] == "abc123"
    [outcome] = h.sink.of(RecordKind.OUTCOME)
    assert (outcome.fields["OUTCOME"], outcome.fields["INCIDENT"]) == ("recovered", "abc123")


async def test_a_copy_cut_off_is_finished_into_the_quarantine(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness()
    state = tmp_path / "state"
    IntentStore(state).save(intent("remove-socket-dir", 1))
    aside = h.root / f".containerd.sock.nodemedic-{STAMP}"
    (aside / "sub").mkdir(parents=True)
    (aside / "sub" / "data").write_text("pod data")
    partial = h.quarantine / f"{STAMP}-containerd.sock.partial"
    (partial / "sub").mkdir(parents=True)  # what the dead copy had made
    h.units.active["containerd.service"] = "inactive"
    runner = restarted(h, state)
    runner.recover()
    await h.settle()
    target = h.quarantine / f"{STAMP}-containerd.sock"
    assert (target / "sub" / "data").read_text() == "pod data"
    assert not aside.exists()
    assert not partial.exists()
    assert h.sock.is_socket(), "containerd started"
    finished = [r for r in h.sink.of(RecordKind.ACTION) if r.fields["ACTION"] == "finish-quarantine"]
    assert finished[0].fields["OUTCOME"] == "done"


def test_a_removal_cut_off_after_a_complete_copy_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, quarantine = tmp_path / "run", tmp_path / "q"
    aside = root / f".containerd.sock.nodemedic-{STAMP}"
    (aside / "sub").mkdir(parents=True)
    (aside / "sub" / "data").write_text("pod data")
    (aside / "top").write_text("x")
    params = RemoveSocketDirParams(
        do="remove-socket-dir", paths=[str(root / "containerd.sock")], root=str(root)
    )
    with monkeypatch.context() as m:  # the copy completes, and nodemedic dies before removing anything
        m.setattr(socket_dir._QuarantineCopy, "_remove_copied", lambda self, fd: False)
        [done] = finish_quarantines(params, FakeClock(), quarantine)
    assert "kept at" in done, done
    assert (aside / "top").exists(), "removal cut off"
    (aside / "new").write_text("written after the copy")  # not in the manifest: stays
    assert finish_quarantines(params, FakeClock(), quarantine) == [], "something new stays: not all removed"
    assert sorted(p.name for p in aside.iterdir()) == ["new"]
    assert (quarantine / f"{STAMP}-containerd.sock" / "top").read_text() == "x"
    (aside / "new").unlink()
    [done] = finish_quarantines(params, FakeClock(), quarantine)
    assert "its copy in" in done
    assert not aside.exists()


def test_an_aside_directory_kept_whole_on_purpose_stays(tmp_path: Path) -> None:
    root, quarantine = tmp_path / "run", tmp_path / "q"
    aside = root / f".containerd.sock.nodemedic-{STAMP}"
    aside.mkdir(parents=True)
    for n in range(3):
        (aside / f"f{n}").write_text("x")
    params = RemoveSocketDirParams(do="remove-socket-dir", paths=[str(root / "containerd.sock")],
                                   root=str(root), max_entries=1)  # fmt: skip
    finish_quarantines(params, FakeClock(), quarantine)  # bounded: kept whole, manifest incomplete
    assert len(list(aside.iterdir())) == 3
    assert finish_quarantines(params, FakeClock(), quarantine) == []
    assert len(list(aside.iterdir())) == 3


async def test_a_rule_gone_since_is_compensated(harness: Callable[..., Harness], tmp_path: Path) -> None:
    h = harness()
    state = tmp_path / "state"
    IntentStore(state).save(RepairIntent(incident="abc123", rule="renamed-rule", started_at=1.7e9, index=0,
                                         step="stop-unit", stopped=("containerd.service",)))  # fmt: skip
    h.units.active["containerd.service"] = "inactive"
    runner = restarted(h, state)
    runner.recover()
    await h.settle()
    assert h.units.calls == [("start", "containerd.service")]
    assert [r.fields["OUTCOME"] for r in h.sink.of(RecordKind.OUTCOME)] == ["compensated"]
    assert not (state / INTENT_FILE).exists()


async def test_a_state_folder_that_refuses_the_record_does_not_stop_a_repair(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    h = harness()
    state = tmp_path / "not-a-folder"
    state.write_text("")  # every save fails (ENOTDIR)
    runner = Executor(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, None, IntentStore(state))
    runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    h.sock.mkdir()
    runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))
    await h.settle()
    assert [r.fields["OUTCOME"] for r in h.sink.of(RecordKind.OUTCOME)] == ["repaired"]
    said = [r for r in h.sink.of(RecordKind.ERROR) if "cannot record the repair" in r.message]
    assert len(said) == 1, "said once, not at every step"


def test_a_damaged_record_at_start_is_reported(harness: Callable[..., Harness], tmp_path: Path) -> None:
    h = harness()
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / INTENT_FILE).write_text('{"version": 1')
    runner = restarted(h, state)
    assert runner.unfinished is None
    [error] = [r for r in h.sink.of(RecordKind.ERROR) if r.fields["OUTCOME"] == "state-reset"]
    assert "repair record unusable" in error.message


async def test_a_repair_in_observe_mode_leaves_the_record_alone(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """Observe-mode repairs do not take the repair lock: one ending while an enforce repair is
    under way must not remove that repair's record."""
    h = harness(mode="observe")
    state = tmp_path / "state"
    IntentStore(state).save(intent("remove-socket-dir", 1))
    runner = Executor(h.runner.policy, h.runner.ctx, h.runner.report, h._spawn, None, IntentStore(state))
    runner.unfinished = None  # as if the enforce repair of this record were under way now
    runner.handle(UnitChanged("containerd.service", "activating", "auto-restart"))
    h.sock.mkdir()
    runner.handle(PathChanged(str(h.sock), PathKind.DIRECTORY, at=h.clock.now))
    await h.settle()
    assert [r.fields["OUTCOME"] for r in h.sink.of(RecordKind.OUTCOME)] == ["observed"]
    assert (state / INTENT_FILE).exists()


async def test_a_repair_cut_off_again_and_again_is_only_undone(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """A step that itself kills nodemedic (OOM while copying, say) must not make a crash loop: each
    start-up counts its resume in the record, and after MAX_RESUMES only the stopped units are started."""
    h = harness()
    state = tmp_path / "state"
    h.sock.mkdir()
    IntentStore(state).save(intent("remove-socket-dir", 1))
    h.units.active["containerd.service"] = "inactive"
    seen: list[int] = []
    serve = h.units.on_start

    def starting(unit: str) -> None:
        seen.append(json.loads((state / INTENT_FILE).read_text())["resumes"])
        serve(unit)

    h.units.on_start = starting
    runner = restarted(h, state)
    runner.recover()
    await h.settle()
    assert seen == [1], "the resume is recorded before any step"

    h.units.calls.clear()
    h.units.active["containerd.service"] = "inactive"
    IntentStore(state).save(dataclasses.replace(intent("remove-socket-dir", 1), resumes=runner_max()))
    runner = restarted(h, state)
    runner.recover()
    await h.settle()
    assert h.units.calls == [("start", "containerd.service")], "nothing resumed, containerd started"
    assert h.sink.of(RecordKind.OUTCOME)[-1].fields["OUTCOME"] == "compensated"
    assert "not resumed again" in h.sink.of(RecordKind.OUTCOME)[-1].fields["DETAIL"]
    assert not (state / INTENT_FILE).exists()


def runner_max() -> int:
    from nodemedic.executor.repairs import MAX_RESUMES

    return MAX_RESUMES
