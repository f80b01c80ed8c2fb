"""Property tests: however processes come, go and reuse PIDs between systemd's lines, a proven
orphan is one incident per process (never two, never none while it lives), and the map of
reported orphans holds live processes only. Bounded under the "ci" profile; ``make fuzz`` runs
many more cases.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemedic.actions.shims import ReportedOrphans

pytestmark = pytest.mark.unit

PIDS = st.integers(min_value=1, max_value=6)  # few PIDs: reuse and naming again are the common case
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("start"), PIDS),  # a process (new, or the PID reused) with a new start time
        st.tuples(st.just("exit"), PIDS),
        st.tuples(st.just("name"), st.lists(PIDS, max_size=4)),  # a line of systemd's naming these
    ),
    max_size=40,
)


def write_stat(proc: Path, pid: int, started: int) -> None:
    (proc / str(pid)).mkdir(exist_ok=True)
    # a comm with a space and a parenthesis: field 22 is read after the last ")"
    (proc / str(pid) / "stat").write_text(f"{pid} (a) b) S " + "0 " * 18 + f"{started} 0 0\n")


@given(STEPS)
def test_one_incident_per_process(steps: list[tuple[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc = Path(tmp)
        seen, alive = ReportedOrphans(), {}  # alive: PID -> start time of the process there now
        reported: set[tuple[int, int]] = set()
        clock = 0
        for op, arg in steps:
            if op == "start" and isinstance(arg, int):
                clock += 1
                alive[arg] = clock
                write_stat(proc, arg, clock)
            elif op == "exit" and isinstance(arg, int) and arg in alive:
                del alive[arg]
                (proc / str(arg) / "stat").unlink()
            elif op == "name" and isinstance(arg, list):
                new = seen.first_seen(arg, str(proc))
                expected = []
                for pid in dict.fromkeys(arg):  # a PID named twice in one look is one
                    if pid in alive and (pid, alive[pid]) not in reported:
                        reported.add((pid, alive[pid]))
                        expected.append(pid)
                assert new == expected
                assert len(seen) <= len(alive)
