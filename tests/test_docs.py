"""The documentation site (mkdocs.yml, docs/) builds, its links and the repository paths it names resolve, and the CLI
reference and the method and stream pages cover what the code registers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cil.cli import RUN_OPTIONS, _run_help, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_snippets" not in p.parts)
DOCUMENTS = [ROOT / "README.md", *PAGES]
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', flags=re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# repository paths as the pages name them (in backticks, code blocks or prose), not parts of URLs or other paths
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:configs|benchmarks|notebooks|streams|docs|tests|methods|cil)/[\w./{},*-]*[\w*}/])"
)


def _text(page: Path) -> str:
    """A page as mkdocs renders it: its ``--8<--`` snippets included."""
    return SNIPPET.sub(lambda match: (ROOT / match.group(1)).read_text(), page.read_text())


def _prose(page: Path) -> str:
    """The page without code blocks and inline code, where ``[x](y)`` and ``# x`` are not links and headings."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", _text(page)))


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (the anchor mkdocs gives a heading)."""
    heading = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    heading = re.sub(r"[^\w\s-]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", heading)


def _anchors(page: Path) -> set[str]:
    return {_slug(heading) for heading in re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", _text(page)), flags=re.M)}


def _expand(path: str) -> list[str]:
    """``streams/specs/nevis_{tiny,short}.yaml`` -> both names."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not match:
        return [path]
    return [
        p for choice in match.group(1).split(",") for p in _expand(path[: match.start()] + choice + path[match.end() :])
    ]


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "methods" / "mos" / "index.html").exists()
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("page", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_repository_paths_exist(page: Path) -> None:
    missing = []
    for named in REPO_PATH.findall(re.sub(r"\]\([^)]*\)", "]", _text(page))):  # links: test_relative_links_resolve
        for path in _expand(named.rstrip(".,")):
            if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                missing.append(path)
    assert not missing, f"{page.name} names files that do not exist: {sorted(set(missing))}"


def test_the_path_check_sees_paths() -> None:
    assert {"configs/experiments/quickstart.yaml", "streams/specs/nevis_{tiny,short,full}.yaml"} <= set(
        REPO_PATH.findall(_text(DOCS / "streams.md") + _text(ROOT / "README.md"))
    )
    assert _expand("streams/specs/nevis_{tiny,full}.yaml") == [
        "streams/specs/nevis_tiny.yaml",
        "streams/specs/nevis_full.yaml",
    ]


def test_every_run_option_is_in_the_cli_reference() -> None:
    reference = (DOCS / "cli.md").read_text()
    flags = {f"--{name}" for name, *_ in RUN_OPTIONS}
    flags |= set(re.findall(r"^  (?:-c, )?(--\w+)", _run_help(), flags=re.M))  # --config, --seeds, --print_config
    flags -= {"--GROUP"}
    missing = sorted(flag for flag in flags if not re.search(f"`{flag}[ `]", reference))
    assert not missing, f"docs/cli.md does not document {missing}"
    rows = set(re.findall(r"^\| `(--\w+)` \|", reference, flags=re.M))  # the run options table: one row each
    assert not sorted({f"--{name}" for name, *_ in RUN_OPTIONS} - rows), "docs/cli.md's run options table lacks a row"


@pytest.mark.parametrize("command", ["summarize", "table", "plot"])
def test_every_analysis_option_is_in_the_cli_reference(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    flags = set(re.findall(r"^  (?:-\w, )?(--[\w-]+)", capsys.readouterr().out, flags=re.M)) - {"--help"}
    section = (DOCS / "cli.md").read_text().split(f"## cil {command}", 1)[1].split("\n## ", 1)[0]
    assert flags and not sorted(flag for flag in flags if f"`{flag}`" not in section)


def test_every_registered_method_has_a_page() -> None:
    from cil.method import list_methods

    index = (DOCS / "methods" / "index.md").read_text()
    registered = {
        p.stem: p.read_text().split("\n\n", 2)[1] for p in (DOCS / "methods").glob("*.md") if p.stem != "index"
    }
    for name in list_methods():
        assert f"`{name}`" in index, f"docs/methods/index.md does not list {name}"
        assert any(f"`{name}`" in line for line in registered.values()), f"no docs/methods page is registered as {name}"


def test_every_registered_stream_has_a_section() -> None:
    from cil.stream import list_streams

    sections = set(re.findall(r"^## (\w+)$", (DOCS / "streams.md").read_text(), flags=re.M))
    assert not sorted(set(list_streams()) - sections), "docs/streams.md needs a '## <name>' section per stream"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert not [p for p in PAGES if p.relative_to(DOCS).as_posix() not in nav]


CONFIG_BULLET = re.compile(r"^- `(configs/[^`]+\.yaml)`: (.*)$", flags=re.M)


def config_summary(config: Path) -> str:
    """What a method page says of a config: the first sentence of the comment the YAML opens with (up to its first
    indented command line), ending in a full stop."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    sentence = re.split(r"(?<!e\.g)(?<!i\.e)\.(?:\s|$)", text, maxsplit=1)[0].rstrip(" :.")
    return sentence + "."


@pytest.mark.parametrize("page", [p for p in PAGES if CONFIG_BULLET.search(p.read_text())], ids=lambda p: p.name)
def test_the_config_a_page_lists_is_described_by_its_own_first_sentence(page: Path) -> None:
    """The list of configs on a method page is the configs' own words, whole: it cannot drift from them."""
    for path, text in CONFIG_BULLET.findall(page.read_text()):
        assert text == config_summary(ROOT / path), f"{page.name}: {path}"
