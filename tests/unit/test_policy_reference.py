"""docs/policy.md is generated from the models: it must be current, and every field must be documented."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from nodemedic import cli
from nodemedic.actions.registry import ACTIONS
from nodemedic.policy.actions import ActionSpec
from nodemedic.policy.model import Policy
from nodemedic.policy.reference import SECTIONS, render

pytestmark = pytest.mark.unit
DOCS = Path(__file__).parents[2] / "docs" / "policy.md"


def models_in(annotation: object) -> set[type[BaseModel]]:
    found: set[type[BaseModel]] = set()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.add(annotation)
    for arg in typing.get_args(annotation):
        found |= models_in(arg)
    return found


def policy_models() -> set[type[BaseModel]]:
    """Every model a policy file can contain: Policy and all the models reachable from its fields."""
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Policy]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for field in cls.model_fields.values():
            todo.extend(models_in(field.annotation))
    return seen


def is_tag(annotation: object) -> bool:
    """A discriminator such as ``do: Literal["stop-unit"]``: its subsection's title documents it."""
    return typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1


def test_committed_reference_is_current() -> None:
    expected = render()
    actual = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                actual.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                "docs/policy.md (committed)",
                "docs/policy.md (from the models)",
            )
        )
        pytest.fail(f"docs/policy.md is out of date with the models: run `make docs`\n{diff[:4000]}")


@pytest.mark.parametrize("cls", sorted(policy_models(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_table_and_field_is_documented(cls: type[BaseModel]) -> None:
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} needs a class docstring (it heads its section)"
    for name, field in cls.model_fields.items():
        if is_tag(field.annotation):
            continue
        assert (field.description or "").strip(), (
            f'{cls.__name__}.{name} needs a docstring: a """...""" line right below it, '
            "which becomes its description in docs/policy.md"
        )


def test_every_table_has_a_section() -> None:
    documented: set[type[BaseModel]] = set()
    for _, spec in SECTIONS:
        documented |= models_in(spec)
    missing = policy_models() - documented - {Policy}
    assert not missing, f"add a section for {sorted(c.__name__ for c in missing)} to reference.SECTIONS"


def test_every_registered_action_appears() -> None:
    text = render()
    union = typing.get_args(typing.get_args(ActionSpec)[0])
    assert set(union) == set(ACTIONS), "the ActionSpec union and the ACTIONS table list different actions"
    for params in union:
        (do,) = typing.get_args(params.model_fields["do"].annotation)
        assert f'### do = "{do}"' in text
        doc = " ".join((params.__doc__ or "").split()).replace("``", "`")
        assert doc in " ".join(text.split()), f"the docstring of {params.__name__} is missing"


def test_rendering_is_deterministic() -> None:
    assert render() == render()


def test_the_cli_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`make docs` runs `nodemedic policy-reference --write docs/policy.md`."""
    assert cli.main(["policy-reference"]) == 0
    assert capsys.readouterr().out == render()
    target = tmp_path / "policy.md"
    assert cli.main(["policy-reference", "--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render()
