"""The ``cardiofed`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cardiofed.data.catalog import DATASETS, load_dataset
from cardiofed.exceptions import CardioFedError
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import run_experiment
from cardiofed.simulation.summary import summary_table, write_experiment_report

app = typer.Typer(help="CardioFed: train a cardiovascular risk model across hospitals "
                       "without moving patient records.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(code=2)


def _run(dataset_name: str, settings: dict[str, Any], *, config_file: Path | None,
         out: Path, title: str, data_dir: Path | None = None, csv: list[Path] | None = None,
         mappings: list[Path] | None = None, n_sites: int = 12) -> None:
    given = {k: v for k, v in settings.items() if v is not None}
    try:
        config = (SimulationConfig.from_toml(config_file, **given) if config_file
                  else SimulationConfig.create(**given))
        dataset = load_dataset(dataset_name, seed=config.seed, data_dir=data_dir, csv=csv,
                               mappings=mappings, n_sites=n_sites)
    except (CardioFedError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    sizes = ", ".join(f"{s.name} {s.n_train}" for s in dataset.sites)
    console.print(f"[bold]{dataset.description or dataset.name}[/]\n"
                  f"{len(dataset.sites)} sites (train rows: {sizes})")
    result = run_experiment(dataset, config, progress=True)
    console.print(summary_table(result))
    page = write_experiment_report(result, out, title=title, notes=[
        dataset.description,
        "Local-only: each site trains alone on its own rows. Federated: only model updates "
        "left the sites. Pooled: one model on the union of all rows, possible only in "
        "simulation. Each site's metrics are computed on its own test split."])
    console.print(f"Report written to [bold]{page}[/]")


@app.command()
def demo(
    sites: Annotated[int, typer.Option(help="Number of synthetic hospitals.")] = 12,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 20,
    algorithm: Annotated[str, typer.Option(help="fedavg, fedprox, fedadam or fedyogi.")] = "fedavg",
    seed: Annotated[int, typer.Option(help="Seed of the cohort and of training.")] = 0,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("cardiofed-report"),
) -> None:
    """Simulate a federation of synthetic hospitals; no data or server needed."""
    _run("synthetic", {"rounds": rounds, "algorithm": algorithm, "seed": seed},
         config_file=None, out=out, n_sites=sites,
         title="CardioFed demo: synthetic federation of hospitals")


@app.command()
def simulate(
    dataset: Annotated[str, typer.Option(help=f"One of {', '.join(DATASETS)}.")] = "synthetic",
    config: Annotated[Path | None, typer.Option(help="TOML file of simulation settings; "
                                                "options given here override it.")] = None,
    csv: Annotated[list[Path] | None, typer.Option(help="A site's CSV export (repeat).")] = None,
    mapping: Annotated[list[Path] | None, typer.Option(
        help="The site's mapping file, in the same order as --csv (repeat).")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder with uci_heart/ and framingham/ (default: $CARDIOFED_DATA_DIR or "
             "../shared/data).")] = None,
    model: Annotated[str | None, typer.Option(help="logistic or mlp.")] = None,
    algorithm: Annotated[str | None, typer.Option(
        help="fedavg, fedprox, fedadam, fedyogi.")] = None,
    rounds: Annotated[int | None, typer.Option()] = None,
    local_epochs: Annotated[int | None, typer.Option()] = None,
    local_steps: Annotated[int | None, typer.Option(help="Fixed steps per round.")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="Local optimiser: sgd or adam.")] = None,
    proximal_mu: Annotated[float | None, typer.Option(help="FedProx mu.")] = None,
    server_lr: Annotated[float | None, typer.Option()] = None,
    standardisation: Annotated[str | None, typer.Option(help="global or per-site.")] = None,
    fraction_fit: Annotated[float | None, typer.Option(help="Share of sites per round.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("cardiofed-report"),
) -> None:
    """Simulate a federation on a reference data set or your own CSV exports."""
    settings = {"model": model, "algorithm": algorithm, "rounds": rounds,
                "local_epochs": local_epochs, "local_steps": local_steps,
                "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
                "proximal_mu": proximal_mu, "server_lr": server_lr,
                "standardisation": standardisation, "fraction_fit": fraction_fit, "seed": seed}
    _run(dataset, settings, config_file=config, out=out, data_dir=data_dir, csv=csv,
         mappings=mapping, title=f"CardioFed simulation: {dataset}")


if __name__ == "__main__":
    app()
