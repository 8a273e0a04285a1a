"""The ``cardiofed`` command line, one module per command group:

* :mod:`~cardiofed.cli.experiments`: ``demo``, ``simulate``, ``audit``, ``features``,
  ``check``, ``attribution`` (in one process, on data at hand);
  :mod:`~cardiofed.cli.survival`: ``survival`` (a federated Cox model, in simulation);
* :mod:`~cardiofed.cli.coordinator`: ``coordinator``; :mod:`~cardiofed.cli.admin`:
  ``admin ...`` and ``status``; :mod:`~cardiofed.cli.node`: ``node ...``;
* :mod:`~cardiofed.cli.serve`: ``serve``, ``predict``; :mod:`~cardiofed.cli.models`:
  ``models ...``; :mod:`~cardiofed.cli.keys`: ``keys ...``;
* :mod:`~cardiofed.cli.db`: ``db upgrade``, ``db current``.

Every command imports what it needs when it runs (PyTorch, scikit-learn, the services):
``cardiofed --help`` and each command's help load none of it.
"""

import typer

from cardiofed.cli import (
    admin,
    coordinator,
    db,
    experiments,
    keys,
    models,
    node,
    serve,
    survival,
)

app = typer.Typer(
    rich_markup_mode=None,  # help is plain text: brackets stay brackets
    help="CardioFed: train a cardiovascular risk model across hospitals "
    "without moving patient records.", no_args_is_help=True)
app.command("demo")(experiments.demo)
app.command("simulate")(experiments.simulate)
app.command("audit")(experiments.audit)
app.command("features")(experiments.features_command)
app.command("check")(experiments.check)
app.command("attribution")(experiments.attribution)
app.command("survival")(survival.survival)
app.command("coordinator")(coordinator.coordinator)
app.command("status")(admin.status)
app.add_typer(admin.admin_app, name="admin")
app.add_typer(node.node_app, name="node")
app.command("serve")(serve.serve)
app.command("predict")(serve.predict)
app.add_typer(models.models_app, name="models")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(db.db_app, name="db")

__all__ = ["app"]
