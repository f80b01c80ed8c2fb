from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

import pytest

from nodemedic.errors import PolicyError
from nodemedic.policy.duration import parse_duration
from nodemedic.policy.edit import UnknownRuleError, set_mode
from nodemedic.policy.load import check_permissions, key_lines, load_policy, parse_policy_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit
SHIPPED = Path(__file__).parents[2] / "policy" / "policy.toml"

MINIMAL_RULE = """
[[rule]]
name = "r"
[[rule.trigger]]
source = "path"
paths = ["/run/containerd/containerd.sock"]
kind = "directory"
[[rule.action]]
do = "start-unit"
unit = "containerd.service"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def line_of(text: str, fragment: str) -> int:
    [line] = [n for n, ln in enumerate(text.splitlines(), 1) if fragment in ln]
    return line


def test_shipped_policy_loads() -> None:
    # The checkout's owner and umask are CI's business; the permission check has its own tests.
    policy = load_policy(SHIPPED, check_owner=False)
    assert policy.daemon.mode == "enforce"
    assert [r.name for r in policy.rule] == [
        "socket-path-is-directory",
        "containerd-hung",
        "containerd-config-broken",
        "containerd-config-edited-broken",
        "containerd-config-broken-while-down",
        "left-over-shims",
        "containerd-fd-exhaustion",
        "containerd-starved",
        "containerd-socket-mode",
        "containerd-socket-denied",
        "containerd-grpc-streams",
        "containerd-state-corrupted",
        "containerd-known-bugs",
    ]
    actions = [a.do for a in policy.rule[0].action]
    assert actions == ["stop-unit", "remove-socket-dir", "start-unit", "verify-containerd", "restart-unit"]


def test_minimal_policy_defaults(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, MINIMAL_RULE))
    assert policy.daemon.quarantine == Path("/var/lib/nodemedic/quarantine")
    assert policy.mode_of(policy.rule[0]) == "enforce"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ('do = "start-unit"', 'do = "remove-dir"'),
            "rule[0] ('r').action[0].do: unknown action 'remove-dir'; known: 'stop-unit'",
        ),
        (('kind = "directory"', 'kind = "folder"'), "rule[0] ('r').trigger[0].kind"),
        (('name = "r"', 'name = "r"\ncolour = "red"'), "rule[0] ('r').colour: unknown key"),
        (('name = "r"', 'name = "Bad Name"'), "rule[0] ('Bad Name').name"),
        (
            ('unit = "containerd.service"', 'unit = "containerd.service"\ntimeout = "soon"'),
            "'soon' is not a duration",
        ),
    ],
)
def test_invalid_policy_names_the_key_and_its_line(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    text = MINIMAL_RULE.replace(*edit)
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(path) in str(err.value)
    [problem] = err.value.problems
    assert expected in problem
    # the line of the edit's last line: the key that is wrong
    assert problem.startswith(f"{line_of(text, edit[1].splitlines()[-1])}: "), problem


def test_bad_regex_is_refused_at_load(tmp_path: Path) -> None:
    text = MINIMAL_RULE.replace(
        'source = "path"\npaths = ["/run/containerd/containerd.sock"]\nkind = "directory"',
        'source = "journal"\npattern = "is a (directory"',
    )
    with pytest.raises(PolicyError) as err:
        load_policy(write(tmp_path, text))
    assert "rule[0] ('r').trigger[0].pattern" in str(err.value)


def test_duplicate_rule_names(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="repeated: r"):
        load_policy(write(tmp_path, MINIMAL_RULE + MINIMAL_RULE))


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not valid TOML") as err:
        load_policy(write(tmp_path, '[daemon]\nmode = "observe"\n[daemon\n'))
    assert err.value.problems[0].startswith("3: not valid TOML:")
    assert "(at line 3, column" in err.value.problems[0]
    with pytest.raises(PolicyError, match="file not found"):
        load_policy(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), (2, 2.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5", "5 days", "-1s", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


# ---- lines in problems ---------------------------------------------------------------------------


def test_every_problem_of_a_broken_shipped_policy_has_its_line(tmp_path: Path) -> None:
    shipped = SHIPPED.read_text()
    text = (
        shipped.replace('do = "remove-socket-dir"', 'do = "remove-dir"')
        .replace('source = "journal"', 'source = "jornal"', 1)
        .replace("factor = 2.0", "factor = 0.5", 1)
    )
    with pytest.raises(PolicyError) as err:
        load_policy(write(tmp_path, text))
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == [
        str(line_of(text, 'source = "jornal"')),
        str(line_of(text, 'do = "remove-dir"')),
        str(line_of(text, "factor = 0.5")),
    ]
    assert ".action[1].do: unknown action 'remove-dir'" in problems[1]
    assert ".trigger[1].source: unknown trigger source 'jornal'" in problems[0]
    assert ".backoff.factor: Input should be greater than or equal to 1" in problems[2]


def test_a_missing_key_points_at_its_table() -> None:
    text = MINIMAL_RULE.replace('do = "start-unit"\n', "")
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text)
    [problem] = err.value.problems
    line = line_of(text, "[[rule.action]]")
    assert problem == f"{line}: rule[0] ('r').action[0]: missing key 'do', which names the action"


def test_one_line_tables_and_arrays_point_at_their_key() -> None:
    text = (
        '[daemon]\nbudget = { repairs = 0 }\nwatch_units = ["a.service",\n  7]\n'
        "daemon_colour = 1\n"
        '[[rule]]\nname = "r"\naction = [{ do = "start-unit", unit = "c.service" }]\n'
        'trigger = [{ source = "path", paths = ["/x"], kind = "folder" }]\n'
    )
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text)
    assert err.value.problems == [
        "2: daemon.budget.repairs: Input should be greater than or equal to 1",
        "4: daemon.watch_units[1]: Input should be a valid string",
        "5: daemon.daemon_colour: unknown key",
        "9: rule[0] ('r').trigger[0].kind: Input should be 'directory', 'socket', 'symlink', 'file', "
        "'other' or 'missing'",
    ]


TRICKY = '''\
# [not.a.table] and key = "not a key"
"quoted.key" = 1
dotted . "and quoted" = { inner = [1, 2], "x y" = 'z' }
str = """
[fake]
fake = "still the string" \\"""
"""
lit = \'\'\'
[[also.fake]] \'\'\'
arr = [ # a comment [ ] {
  "one", # and another
  { a = 1 },
  [ "nested", ']' ],
]
after = 1979-05-27T07:32:00Z # a date

[[t]]
a = "x\\"y"
[t.sub]
b = 2
[[t.many]]
[[t.many]]
c = """a "quoted" word"""""
[[t]]
[[t.many]]
d = 4
[ "spaced" . table ]
e = 5
'''


def test_key_lines_of_tricky_toml() -> None:
    lines = key_lines(TRICKY)
    text = TRICKY.splitlines()
    expected = {
        ("quoted.key",): 2,
        ("dotted", "and quoted", "inner", 1): 3,
        ("dotted", "and quoted", "x y"): 3,
        ("str",): 4,
        ("lit",): 8,
        ("arr", 0): 11,
        ("arr", 1, "a"): 12,
        ("arr", 2, 1): 13,
        ("after",): 15,
        ("t", 0, "a"): 18,
        ("t", 0, "sub", "b"): 20,
        ("t", 0, "many", 1, "c"): 23,
        ("t", 1): 24,
        ("t", 1, "many", 0, "d"): 26,
        ("spaced", "table", "e"): 28,
    }
    assert {k: lines.get(k) for k in expected} == expected
    assert not any("fake" in str(k) for k in lines)
    # every key tomllib sees is found on a line that names it
    data = tomllib.loads(TRICKY)
    for key in leaf_keys(data):
        assert str(key[-1]).split(" ")[0] in text[lines[key] - 1] or isinstance(key[-1], int), key


def leaf_keys(node: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(node, dict):
        return [k for name, v in node.items() for k in leaf_keys(v, (*prefix, name))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in leaf_keys(v, (*prefix, i))]
    return [prefix]


def test_key_lines_never_fail_on_bad_text() -> None:
    for text in ['a = "unterminated', "a = [1, 2", "[[t", 'a = """x', "a = {b = ]"]:
        key_lines(text)  # partial lines at most, never an error or a hang


# ---- who may write the policy ---------------------------------------------------------------------


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def test_root_owned_0644_in_0755_is_fine(root_dir: Path) -> None:
    path = write(root_dir, MINIMAL_RULE)
    path.chmod(0o644)
    check_permissions(path)
    assert load_policy(path).rule[0].name == "r"


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda p: p.chmod(0o666), "writable by group or others (mode 0666): run `chmod go-w {file}`"),
        (lambda p: p.chmod(0o664), "writable by group or others (mode 0664): run `chmod go-w {file}`"),
        (lambda p: os.chown(p, 1000, 1000), "owned by uid 1000, not root: run `chown root {file}`"),
        (
            lambda p: p.parent.chmod(0o777),
            "directory {dir} is writable by group or others (mode 0777): run `chmod go-w {dir}`",
        ),
        (
            lambda p: os.chown(p.parent, 1000, 0),
            "directory {dir} is owned by uid 1000, not root: run `chown root {dir}`",
        ),
    ],
)
def test_a_policy_others_could_write_is_refused(root_dir: Path, spoil: object, expected: str) -> None:
    path = write(root_dir, MINIMAL_RULE)
    path.chmod(0o644)
    spoil(path)  # type: ignore[operator]
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    [problem] = err.value.problems
    assert problem == expected.format(file=path, dir=root_dir)
    assert load_policy(path, check_owner=False).rule[0].name == "r"


def test_a_symlinked_policy_checks_its_target_directory(root_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    target = write(elsewhere, MINIMAL_RULE)
    (root_dir / "policy.toml").symlink_to(target)
    with pytest.raises(PolicyError, match=f"run `chmod go-w {elsewhere}`"):
        load_policy(root_dir / "policy.toml")


# ---- editing the mode ------------------------------------------------------------------------------


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


def test_daemon_mode_changes_one_line_and_keeps_every_comment() -> None:
    text = SHIPPED.read_text()
    old = parse_policy_text(text).daemon.mode
    new = "observe" if old == "enforce" else "enforce"
    edited = set_mode(text, new)
    assert changed_lines(text, edited) == ([f'mode = "{old}"'], [f'mode = "{new}"'])
    # the same line, in place (rules and [sighup] have mode lines of their own)
    assert [n for n, (a, b) in enumerate(zip(text.splitlines(), edited.splitlines(), strict=True)) if a != b]
    comments = [ln for ln in text.splitlines() if ln.lstrip().startswith("#")]
    assert [ln for ln in edited.splitlines() if ln.lstrip().startswith("#")] == comments
    assert parse_policy_text(edited).daemon.mode == new


def test_rule_mode_is_inserted_after_name_and_description() -> None:
    text = SHIPPED.read_text()
    policy = parse_policy_text(text)
    rule = policy.rule[0]
    assert rule.mode is None, "the shipped rule has its own mode now: pick another text for this test"
    edited = set_mode(text, "observe", rule.name)
    assert changed_lines(text, edited) == ([], ['mode = "observe"'])
    first_description = line_of(text, f'description = "{rule.description}"')
    assert edited.splitlines()[first_description] == 'mode = "observe"'
    after = parse_policy_text(edited)
    assert after.rule[0].mode == "observe"
    assert after.daemon == policy.daemon


def test_rule_mode_is_replaced_in_place() -> None:
    text = MINIMAL_RULE.replace('name = "r"', 'name = "r"\nmode = "observe"  # while we watch it\n\n# x')
    edited = set_mode(text, "enforce", "r")
    assert changed_lines(text, edited) == (
        ['mode = "observe"  # while we watch it'],
        ['mode = "enforce"  # while we watch it'],
    )


def test_rule_mode_without_description_goes_after_name() -> None:
    edited = set_mode(MINIMAL_RULE, "observe", "r")
    assert 'name = "r"\nmode = "observe"\n[[rule.trigger]]' in edited
    assert parse_policy_text(edited).rule[0].mode == "observe"


def test_daemon_mode_is_added_where_missing() -> None:
    edited = set_mode(MINIMAL_RULE, "observe")
    assert parse_policy_text(edited).daemon.mode == "observe"
    assert edited.startswith(MINIMAL_RULE)


def test_unknown_rule_lists_the_known_ones() -> None:
    with pytest.raises(UnknownRuleError, match="no rule named 'nope'; the policy's rules: 'r', 's'"):
        set_mode(MINIMAL_RULE + MINIMAL_RULE.replace('"r"', '"s"'), "observe", "nope")


def test_trigger_on_an_unwatched_unit_is_refused(tmp_path: Path) -> None:
    text = MINIMAL_RULE.replace(
        'source = "path"\npaths = ["/run/containerd/containerd.sock"]\nkind = "directory"',
        'source = "journal"\nunit = "docker.service"\npattern = "x"',
    )
    with pytest.raises(
        PolicyError, match=r"journal trigger on docker.service, which is not in \[daemon\].journal_units"
    ):
        load_policy(write(tmp_path, text))


# ---- hostile files: every failure to load is a PolicyError with a line (issue 11, finding 6) -------


def only_problem(text: str) -> str:
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text)
    [problem] = err.value.problems
    return problem


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("[daemon]\nwatch_units = " + "[" * 2000 + "]" * 2000 + "\n", 2, "nested more than 16 deep"),
        ("a = 1\nb = " + "{ c = " * 2000 + "1" + " }" * 2000 + "\n", 2, "nested more than 16 deep"),
        ("[daemon]\nwatch_units = " + "[" * 20 + "]" * 20 + "\n", 2, "nested more than 16 deep"),
        ("# ok\n" + "a." * 30 + "b = 1\n", 2, "a key of dotted parts more than 16 deep"),
        ("[" + ".".join(["t"] * 30) + "]\n", 1, "a key of dotted parts more than 16 deep"),
        # tomllib's memory grows with the square of a key's parts: 1.5 GB at 20,000
        ("a" + ".a" * 300_000 + " = 1\n", 1, "a key of dotted parts more than 16 deep"),
        ("[daemon.budget]\nrepairs = " + "9" * 5000 + "\n", 2, "a number with more than 4300 digits"),
        ("[daemon.budget]\n\nrepairs = 0x" + "f" * 40 + "\n", 3, "integer out of TOML's 64-bit range"),
        ('[[rule]]\nname = "r"\nx = [[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]\n', 3, "nested more than"),
    ],
    ids=[
        "arrays-2000",
        "inline-tables-2000",
        "arrays-20",
        "dotted-key-30",
        "dotted-header-30",
        "dotted-key-300000",
        "int-5000-digits",
        "hex-160-bits",
        "arrays-in-a-rule",
    ],
)
def test_hostile_toml_is_a_policy_error_with_its_line(text: str, line: int, expected: str) -> None:
    problem = only_problem(text)
    assert problem.startswith(f"{line}: "), problem
    assert expected in problem


def test_brackets_inside_strings_and_comments_are_not_nesting() -> None:
    text = (
        'x = "' + "[" * 40 + '"\ny = \'\'\'\n' + "{" * 40 + "\n'''\n# " + "[" * 40
        + '\nz = """\\"""' + "[" * 40 + '"""\n[[rule]]\nname = "r"\n'
    )  # fmt: skip
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text)
    assert err.value.problems[:3] == ["1: x: unknown key", "2: y: unknown key", "6: z: unknown key"]


def write_bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "policy.toml"
    path.write_bytes(data)
    return path


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, b'[daemon]\nmode = "observe"\n# caf\xe9\n')
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert err.value.problems == ["3: not UTF-8 text (byte 0xe9): save the file as UTF-8"]


def test_binary_is_a_policy_error_with_a_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(write_bytes(tmp_path, b"\x7fELF\x02\x01\x01\x00\x00\x00\n\x00\x00"))
    assert err.value.problems[0].startswith("1: "), err.value.problems


def loads_within(path: Path, seconds: float = 5.0, *, check_owner: bool = True) -> PolicyError:
    """load_policy(path) in a thread: a FIFO must not block it (the test fails instead of hanging)."""
    import threading

    caught: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(caught, path, check_owner), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"loading {path} blocked"
    [exc] = caught
    assert isinstance(exc, PolicyError), repr(exc)
    return exc


def _catch(into: list[BaseException], path: Path, check_owner: bool) -> None:
    try:
        load_policy(path, check_owner=check_owner)
    except BaseException as exc:  # the test checks what it is
        into.append(exc)


def test_a_directory_fifo_or_device_at_the_policy_path(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    assert loads_within(tmp_path / "dir").problems[0].startswith("a directory (mode 40")
    assert loads_within(tmp_path / "fifo").problems[0].startswith("not a regular file (mode 10")
    assert (
        loads_within(tmp_path / "zero", check_owner=False)
        .problems[0]
        .startswith("not a regular file (mode 20")
    )


def test_a_huge_file_and_a_symlink_loop(tmp_path: Path) -> None:
    big = write(tmp_path, "# padding\n" * 200_000)
    assert loads_within(big).problems == ["larger than 1024 KiB: not a policy file"]
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "cannot read" in loads_within(tmp_path / "a").problems[0]


def test_state_dir_is_salvaged_from_a_policy_that_does_not_load(tmp_path: Path) -> None:
    from nodemedic.policy.load import salvage_state_dir

    text = '[daemon]\nstate_dir = "/srv/nm"\n[[rule]]\nname = "Broken Name"\n'
    assert salvage_state_dir(write(tmp_path, text)) == Path("/srv/nm")
    assert salvage_state_dir(write(tmp_path, '[daemon]\nstate_dir = "srv/nm"\n')) is None
    assert salvage_state_dir(write(tmp_path, "x = " + "[" * 3000)) is None
    assert salvage_state_dir(tmp_path / "absent.toml") is None


# ---- values that load but cannot work (issue 11, finding 7) -----------------------------------------


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), -float("inf"), 1e308, 10**5000, -(10**5000), "99999999999h"],
    ids=["nan", "inf", "-inf", "1e308", "10**5000", "-10**5000", "99999999999h"],
)
def test_durations_are_finite_and_bounded(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_the_longest_duration_is_30_days() -> None:
    assert parse_duration("720h") == 30 * 24 * 3600
    with pytest.raises(ValueError, match=r'longer than the longest duration allowed, 30 days \("720h"\)'):
        parse_duration("721h")


@pytest.mark.parametrize(
    ("table", "key", "value", "expected"),
    [
        ("daemon.budget", "window", "nan", "nan is not a duration"),
        ("daemon.budget", "window", "inf", "inf is not a duration"),
        ("daemon.budget", "window", '"0s"', "must be longer than 0"),
        ("daemon.probe", "interval", "nan", "nan is not a duration"),
        ("daemon.probe", "interval", '"1ms"', "an interval must be at least 100ms"),
        ("daemon.probe", "interval", "0", "an interval must be at least 100ms"),
        ("daemon.probe", "timeout", "0", "must be longer than 0"),
        ("daemon.resources", "interval", '"10ms"', "an interval must be at least 100ms"),
        ("daemon.config_backup", "settle", "-inf", "-inf is not a duration"),
        ("sighup.throttle", "per", "0", "must be longer than 0"),
        ("sighup.storm", "window", "1e300", "longer than the longest duration allowed"),
        ("sighup.coalesce", "interval", "nan", "nan is not a duration"),
    ],
)
def test_bad_durations_in_the_policy(table: str, key: str, value: str, expected: str) -> None:
    text = f"[{table}]\n{key} = {value}\n"
    problem = only_problem(text)
    assert problem.startswith(f"2: {table}.{key}: "), problem
    assert expected in problem


RULE_WITH = """
[[rule]]
name = "r"
[[rule.trigger]]
source = "signal"
signal = {signal}
[[rule.action]]
do = "signal-unit"
unit = "containerd.service"
signal = {signal}
"""


@pytest.mark.parametrize("signal", ["32", "34", "40", "64", "0", "65", '"SIGRTMIN"', '"RTMAX"', "-1"])
def test_only_standard_signals_load(signal: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy_text(RULE_WITH.format(signal=signal))
    assert [p.split(":")[0] for p in err.value.problems] == ["6", "10"]
    assert "is not a signal nodemedic can use" in err.value.problems[0]
    assert "a number 1-31 (real-time signals are refused)" in err.value.problems[0]


@pytest.mark.parametrize(("signal", "number"), [("1", 1), ('"HUP"', 1), ('"sigterm"', 15), ("31", 31)])
def test_standard_signals_load(signal: str, number: int) -> None:
    policy = parse_policy_text(RULE_WITH.format(signal=signal))
    assert policy.rule[0].trigger[0].signal == number  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("daemon", "state_dir"),
        ("daemon", "quarantine_dir"),
        ("daemon.config_backup", "path"),
        ("daemon.probe", "socket"),
        ("sighup", "proc"),
        ("sighup", "tracefs"),
    ],
)
@pytest.mark.parametrize(
    "path", ["var/lib/nodemedic", "/var/lib/../etc", "/var//lib", "/var/lib/", "/", "/a/./b"]
)
def test_settings_paths_are_absolute_and_normalised(table: str, key: str, path: str) -> None:
    problem = only_problem(f'[{table}]\n{key} = "{path}"\n')
    assert problem.startswith(f"2: {table}.{key}: {path!r} must be an absolute, normalised path: "), problem


@pytest.mark.parametrize(
    ("action", "key"),
    [
        ("restore-config", "path"),
        ("kill-orphaned-shims", "bundles"),
        ("kill-orphaned-shims", "proc"),
        ("verify-containerd", "socket"),
        ("raise-nofile-limit", "dropin_root"),
    ],
)
def test_action_paths_are_absolute_and_normalised(action: str, key: str) -> None:
    text = MINIMAL_RULE.replace(
        'do = "start-unit"\nunit = "containerd.service"', f'do = "{action}"\n{key} = "proc"'
    )
    where = f"{line_of(text, key + ' = ')}: rule[0] ('r').action[0].{key}"
    problem = only_problem(text)
    assert problem.startswith(f"{where}: 'proc' must be an absolute, normalised path"), problem


def test_a_path_with_a_nul_is_refused() -> None:
    problem = only_problem('[daemon]\nstate_dir = "/var/lib/nm\\u0000x"\n')
    assert problem == (
        "2: daemon.state_dir: '/var/lib/nm\\x00x' contains a NUL character, which no path can hold: remove it"
    )


def test_confirm_paths_are_absolute() -> None:
    text = (
        MINIMAL_RULE
        + '[rule.confirm]\npaths = ["containerd.sock"]\nkind = "directory"\nconfig_broken = "c.toml"\n'
    )
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text)
    where = [p.split(": ")[1] for p in err.value.problems]
    assert where == ["rule[0] ('r').confirm.paths[0]", "rule[0] ('r').confirm.config_broken"]


# ---- every folder on the way to the policy (issue 12, fault matrix item 5) ------------------------


def test_a_policy_reached_through_a_users_link_in_a_sticky_folder_is_refused(
    root_dir: Path, tmp_path: Path
) -> None:
    """/etc/nodemedic/policy.toml -> /tmp/link -> a safe file: the user who owns /tmp/link can
    point it anywhere, so the safe file behind it proves nothing."""
    real = write(root_dir, MINIMAL_RULE)
    real.chmod(0o644)
    public = tmp_path / "tmp"
    public.mkdir()
    public.chmod(0o1777)
    link = public / "link"
    link.symlink_to(real)
    entry = root_dir / "main.toml"
    entry.symlink_to(link)
    check_permissions(entry)  # root's own link in a sticky folder: nobody else may swap it
    os.lchown(link, 1000, 1000)
    with pytest.raises(PolicyError) as err:
        load_policy(entry)
    assert err.value.problems == [
        f"directory {public} on the way to the policy is writable by group or others (mode 1777): "
        f"anyone could swap {link}; keep the policy and its links in root's folders"
    ]


def test_a_policy_below_a_world_writable_folder_is_refused(root_dir: Path) -> None:
    """/srv/open (0777) /etc/policy.toml: anyone can rename etc/ and put their own in its place."""
    inner = root_dir / "etc"
    inner.mkdir(mode=0o755)
    path = write(inner, MINIMAL_RULE)
    path.chmod(0o644)
    check_permissions(path)
    root_dir.chmod(0o777)
    with pytest.raises(PolicyError, match=f"directory {root_dir} on the way to the policy is writable"):
        check_permissions(path)
