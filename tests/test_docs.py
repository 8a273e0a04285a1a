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
PERCENT = re.compile(r"%|[-\u2013]\d[\d.,]*%")  # 98.3% or the 98.7 of 98.7-99.1%
MILLISECONDS = re.compile(r" ms\b")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


CITATION = re.compile(r"bench/(?:results/)?(\w+)\.(?:py|md|json)")


def _citations(text: str) -> list[str]:
    return sorted({name for name in CITATION.findall(text)
                   if (RESULTS / f"{name}.md").exists()})


def _figures(text: str) -> list[str]:
    """The figures of `text` outside code, a percentage with its ``%``."""
    text = re.sub(r"`[^`]*`", "", text)
    return [m[1] + ("%" if PERCENT.match(text, m.end())
                    else " ms" if MILLISECONDS.match(text, m.end()) else "")
            for m in FIGURE.finditer(text)]


def _table_figures(table: str) -> list[str]:
    """A table's figures: those of its text, and every cell that is a number (the first
    column names the rows)."""
    cells = [cell.strip() for row in table.strip().splitlines()[2:]
             for cell in row.strip().strip("|").split("|")[1:]]
    return _figures(table) + [c for c in cells if NUMBER.fullmatch(c.rstrip("%"))
                              and "." not in c]


def _cited_figures() -> list[tuple[str, tuple[str, ...], str]]:
    """(page, results files, figure) for each figure in a sentence of the README or docs/
    that cites a benchmark (``bench/NAME.py`` or ``bench/results/NAME.md``), and in each
    table that cites one or follows a paragraph that does."""
    out = []
    for page in PAGES:
        blocks = re.split(r"\n\s*\n", _prose(page))
        for i, block in enumerate(blocks):
            if block.lstrip().startswith("|"):
                cited = _citations(block) or (_citations(blocks[i - 1]) if i else [])
                out += [(page.name, tuple(cited), f) for f in _table_figures(block) if cited]
                continue
            for sentence in re.split(r"(?<=[.;:!?])\s+(?=[A-Z(`])", block):
                cited = _citations(sentence)
                out += [(page.name, tuple(cited), f) for f in _figures(sentence) if cited]
    return out


def _stated_in(figure: str, results: str) -> bool:
    """The figure, as written, is a number of the results rounded to its digits (a
    percentage also as a fraction, ``98.3%`` is 0.983; milliseconds also as seconds)."""
    factor = 100 if figure.endswith("%") else 1000 if figure.endswith(" ms") else None
    figure = figure.removesuffix("%").removesuffix(" ms")
    digits = len(figure.split(".")[1]) if "." in figure else 0
    value = float(figure.replace(",", ""))
    numbers = [abs(float(n.replace(",", ""))) for n in NUMBER.findall(results)]
    return any(round(n, digits) == value
               or (factor is not None and round(factor * n, digits) == value)
               for n in numbers)


def _results(name: str) -> str:
    """A benchmark's results as its Markdown states them (not its JSON: thousands of
    numbers there would let almost any figure pass)."""
    return (RESULTS / f"{name}.md").read_text()


def test_figures_quoted_beside_a_benchmark_come_from_its_results_file() -> None:
    cited = _cited_figures()
    assert len(cited) >= 3  # the rule has something to check
    stale = [(page, names, figure) for page, names, figure in cited
             if not any(_stated_in(figure, _results(n)) for n in names)]
    assert not stale, f"figures not in the results file their sentence cites: {stale}"
