"""Keeps README.md true: its Flax example runs, and CI runs its test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_flax_example_runs():
    code = next(b for b in readme_blocks("python") if "train_step" in b)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    loss = float(namespace["loss"])
    assert loss == loss and loss > 0  # finite and positive
    assert namespace["centers"].shape == (10, 2)
    assert float(abs(namespace["centers"]).sum()) > 0  # the α rule moved the centers


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in readme_blocks("bash")]
    assert len(commands) == 2, "README must have exactly two set-up commands"
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
