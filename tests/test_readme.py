"""Following the README leaves the checkout clean: every file its commands write lands in a git-ignored folder."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _ignored(path: str) -> bool:
    """Whether ``path`` (relative to the repository root) lies under a folder that .gitignore names."""
    folders = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip().endswith("/")]
    parts = Path(path).parts
    return any(folder.rstrip("/") in parts[:-1] or Path(path).as_posix().startswith(folder) for folder in folders)


def _readme_commands() -> list[list[str]]:
    """The ``cil`` commands of the README's bash blocks, split into arguments (``&&`` chains split too, lines ending in
    a backslash joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():  # continuation lines joined
        for part in line.split("#")[0].split("&&"):
            words = shlex.split(part)
            if words[:1] == ["cil"]:
                commands.append(words)
    return commands


def _written_path(words: list[str]) -> str | None:
    """Where a README command writes: its ``--out``, or the ``out:`` of the config of a ``cil run`` without one."""
    if "--out" in words:
        return words[words.index("--out") + 1]
    if words[1] == "run" and "--print_config" not in words and "--help" not in words:
        config = yaml.safe_load((ROOT / words[words.index("--config") + 1]).read_text())
        return str(config.get("out", "runs/latest"))
    return None


def test_the_readme_has_commands_to_check() -> None:
    commands = _readme_commands()
    assert sum(words[1] == "run" for words in commands) >= 5 and any(words[1] == "plot" for words in commands)


@pytest.mark.parametrize("words", _readme_commands(), ids=lambda words: " ".join(words[1:4]))
def test_readme_commands_write_only_into_ignored_folders(words: list[str]) -> None:
    path = _written_path(words)
    assert path is None or _ignored(path), f"`{' '.join(words)}` writes {path}, which git would show"


def test_readme_commands_do_not_share_a_run_directory() -> None:
    runs = [(_written_path(words), words) for words in _readme_commands() if words[1] == "run"]
    fresh = [path for path, words in runs if path is not None and "--resume" not in words]
    assert len(fresh) == len(set(fresh)), f"two README runs write the same directory: {sorted(fresh)}"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_writes_into_an_ignored_folder(config: Path) -> None:
    out = yaml.safe_load(config.read_text()).get("out")
    assert out is None or _ignored(out), f"{config.name} writes {out}"


def test_notebooks_write_their_figures_into_an_ignored_folder() -> None:
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        source = "".join("".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"])
        for default in re.findall(r'os\.environ\.get\("CIL_FIGURES", "([^"]+)"\)', source):
            written = (notebook.parent / default).resolve().relative_to(ROOT)  # notebooks run in their folder
            assert _ignored(f"{written.as_posix()}/figure.png"), f"{notebook.name} writes figures to {written}"
