"""The README's promises that code cannot keep by itself: its commands are the real ones."""

from __future__ import annotations

import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_readme_test_command_is_exactly_what_ci_runs() -> None:
    block = code_blocks(README.split("Run the tests", 1)[1])[0]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line and not line.startswith("#")
                and not line.startswith(("set ", "cd "))]
    assert commands == block.strip().splitlines()
    assert "exactly what `.ci/run` runs" in README


def test_readme_says_how_to_reach_the_installed_command_before_using_it() -> None:
    tour = README.split("## A five-minute tour", 1)[1]
    bare = tour.index("\nevserver serve")  # the first bare `evserver` command
    assert ". .venv/bin/activate" in tour[:bare] and ".venv/bin/evserver" in tour[:bare]
