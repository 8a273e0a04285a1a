"""The README and docs/ stay true to the code: every link resolves, every ``cardiofed``
command in them names a command and options that exist, and the README stays short."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cardiofed.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip("# ").strip().lower())
    return text.replace(" ", "-")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


def _anchors(page: Path) -> set[str]:
    return {_slug(line) for line in _prose(page).splitlines() if line.startswith("#")}


def _commands(page: Path) -> list[str]:
    """The ``cardiofed ...`` lines of the page's shell blocks, continuations joined and
    comments dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("cardiofed "):
                out.append(line)
    return out


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md"
                                 and anchor not in _anchors(file)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_names_real_commands_and_options(page: Path) -> None:
    root = typer.main.get_command(app)
    wrong = []
    for line in _commands(page):
        words = shlex.split(line)[1:]
        command = root
        # A group has sub-commands (typer's click types, checked by what they do).
        while hasattr(command, "commands") and words and not words[0].startswith("-"):
            sub = command.commands.get(words[0])
            if sub is None:
                wrong.append(f"{line}: no command {words[0]!r}")
                break
            command, words = sub, words[1:]
        else:
            known = {name for p in command.params for name in (*p.opts, *p.secondary_opts)}
            wrong += [f"{line}: no option {w.split('=')[0]!r}" for w in words
                      if w.startswith("--") and w.split("=")[0] not in known]
    assert wrong == []


RESULTS = ROOT / "bench" / "results"
# A figure: a decimal, or whole (milli)seconds ("37 s"); what code spans hold is a setting.
FIGURE = re.compile(r"(?<![\w.\-+/])(\d[\d,]*\.\d+|\d+(?= m?s\b))(?![\w.])")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _cited_figures() -> list[tuple[str, str, str]]:
    """(page, results file, figure) for each figure in a sentence of the README or docs/
    that cites a benchmark (``bench/NAME.py`` or ``bench/results/NAME.md``)."""
    out = []
    for page in PAGES:
        for sentence in re.split(r"(?<=[.;:!?])\s+(?=[A-Z(`])|\n\s*\n", _prose(page)):
            cited = sorted({name for name in re.findall(
                r"bench/(?:results/)?(\w+)\.(?:py|md|json)", sentence)
                if (RESULTS / f"{name}.md").exists()})
            figures = FIGURE.findall(re.sub(r"`[^`]*`", "", sentence))
            out += [(page.name, name, figure) for name in cited[:1] if len(cited) == 1
                    for figure in figures]
    return out


def _stated_in(figure: str, results: str) -> bool:
    """The figure, as written, is a number of the results file rounded to its digits."""
    digits = len(figure.split(".")[1]) if "." in figure else 0
    value = float(figure.replace(",", ""))
    return any(round(abs(float(n.replace(",", ""))), digits) == value
               for n in NUMBER.findall(results))


def test_figures_quoted_beside_a_benchmark_come_from_its_results_file() -> None:
    cited = _cited_figures()
    assert len(cited) >= 3  # the rule has something to check
    stale = [(page, f"bench/results/{name}.md", figure) for page, name, figure in cited
             if not _stated_in(figure, (RESULTS / f"{name}.md").read_text())]
    assert not stale, f"figures not in the results file their sentence cites: {stale}"
