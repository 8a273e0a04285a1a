"""Console output shared by the command-line modules."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
errors = Console(stderr=True, soft_wrap=True)


def fail(message: object) -> typer.Exit:
    """Print `message` as an error (its brackets kept, never read as markup) and return
    the exit (code 2) to raise."""
    errors.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False)
    return typer.Exit(code=2)
