"""Following the README (and the docs pages) leaves the checkout clean: every file their commands write lands in a
git-ignored folder; and every ``cil`` command of the README parses."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _ignored(path: str) -> bool:
    """Whether ``path`` (relative to the repository root) lies under a folder that .gitignore names."""
    folders = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip().endswith("/")]
    parts = Path(path).parts
    return any(folder.rstrip("/") in parts[:-1] or Path(path).as_posix().startswith(folder) for folder in folders)


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _readme_commands(document: Path = ROOT / "README.md") -> list[list[str]]:
    """The ``cil`` commands of a document's bash blocks, split into arguments (``&&`` chains split too, lines ending in
    a backslash joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S)
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


def _all_commands() -> list[list[str]]:
    """The ``cil`` commands of the README and of every docs page."""
    return [words for document in DOCUMENTS for words in _readme_commands(document)]


@pytest.mark.parametrize("words", _all_commands(), ids=lambda words: " ".join(words[1:4]))
def test_readme_commands_write_only_into_ignored_folders(words: list[str]) -> None:
    path = _written_path(words)
    assert path is None or _ignored(path), f"`{' '.join(words)}` writes {path}, which git would show"


def test_readme_commands_do_not_share_a_run_directory() -> None:
    """Two different fresh runs never write one directory, within a page or across the README and the docs (the same
    command may appear on several pages)."""
    writers: dict[str, set[str]] = {}
    for words in _all_commands():
        path = _written_path(words) if words[1] == "run" and "--resume" not in words else None
        if path is not None:
            writers.setdefault(path, set()).add(" ".join(words))
    shared = {path: sorted(commands) for path, commands in writers.items() if len(commands) > 1}
    assert not shared, f"different runs write the same directory: {shared}"


def test_the_docs_have_commands_to_check() -> None:
    assert sum(len(_readme_commands(document)) for document in DOCUMENTS[1:]) >= 10


class _ParsedError(Exception):
    """Raised in place of running a command once its arguments parsed."""


@pytest.mark.parametrize(
    "words",
    [words for words in _readme_commands() if "--help" not in words],  # --help: checked in tests/test_docs.py
    ids=lambda words: " ".join(words[1:4]),
)
def test_readme_commands_parse(
    words: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every README ``cil`` command parses, in-process and without writing: ``cil run`` with ``--print_config`` (which
    prints the resolved config and exits), the analysis commands up to their argument parser."""
    from cil.cli import main

    monkeypatch.chdir(ROOT)  # the commands name configs relative to the checkout
    if words[1] == "run":
        with pytest.raises(SystemExit) as exit_info:
            main([*words[1:], "--print_config"])
        assert exit_info.value.code == 0, capsys.readouterr().err
        assert "method:" in capsys.readouterr().out
        return
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        original(parser, *args, **kwargs)  # exits 2 on an unknown option or a bad value
        raise _ParsedError

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_ParsedError):
        main(words[1:])


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


@pytest.mark.slow
def test_the_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python API block as written (the offline EfficientNet-Lite0 and Animal-MNIST), with two changes
    only: a few images per class, and its run directory in this test's folder."""
    pytest.importorskip("onnx")
    [block] = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    small = '"increment": 2, "train_per_class": 4, "test_per_class": 4}'
    assert block.count('"increment": 2}') == 1 and block.count('"runs/api"') == 1, "update this test with the README"
    code = block.replace('"increment": 2}', small).replace('"runs/api"', repr(str(tmp_path / "api")))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["complete"] and summary["num_tasks"] == 5 and summary["method"] == "simplecil"
    assert (tmp_path / "api" / "summary.json").is_file()
