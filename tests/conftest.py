"""Shared fixtures: the reference data sets (skipped cleanly when absent) and small
federations that every test module can build in milliseconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.paths import data_dir, require
from cardiofed.data.synthetic import synthetic_federation

# The models are tiny: one thread is fastest, and it avoids OpenMP spin-waiting when the
# test run shares a small machine with other work.
torch.set_num_threads(1)

UCI_FILES = tuple(f"processed.{c}.data" for c in ("cleveland", "hungarian", "switzerland", "va"))


def _require_reference(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found at {path}; set CARDIOFED_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def uci_dir() -> Path:
    """The folder holding the four UCI Heart Disease ``processed.*.data`` files (the data
    folder's, else the copy packaged with CardioFed: never skipped)."""
    folder = require("uci_heart")
    for name in UCI_FILES:
        _require_reference(folder / name)
    return folder


@pytest.fixture(scope="session")
def framingham_csv() -> Path:
    """The Framingham teaching data set, ``framingham/framingham.csv``."""
    return _require_reference(data_dir() / "framingham" / "framingham.csv")


@pytest.fixture(scope="session")
def small_federation() -> FederatedDataset:
    """Four synthetic hospitals (tier-3, tier-2, two clinics), about 1,200 rows in all."""
    return synthetic_federation(n_sites=4, seed=1, size_scale=0.3)


@pytest.fixture(autouse=True)
def _registry_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands that write the model registry (``cardiofed demo``) write it under the
    test's own folder, never into the working directory."""
    monkeypatch.setenv("CARDIOFED_DATABASE_URL", f"sqlite:///{tmp_path}/registry.db")


@pytest.fixture
def postgres_url(worker_id: str) -> str:
    """``CARDIOFED_TEST_POSTGRES_URL`` with every table of the store dropped (a clean
    schema for the test); the test is skipped when it is not set. Under pytest-xdist each
    worker has a PostgreSQL schema of its own in that database (the URL's search path),
    so two workers' tests never share a table."""
    url = os.environ.get("CARDIOFED_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set CARDIOFED_TEST_POSTGRES_URL (e.g. postgresql+psycopg://u:p@127.0.0.1/db; "
                    ".ci/run does when a PostgreSQL server is installed) to test PostgreSQL")
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from cardiofed.store import Base, make_engine, session_factory

    session_factory.cache_clear()  # an engine cached by an earlier test knew the old tables
    if worker_id != "master":
        schema = f"cardiofed_{worker_id}"
        engine = make_engine(url, check_schema=False)
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        engine.dispose()
        url = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}) \
            .render_as_string(hide_password=False)
    engine = make_engine(url, check_schema=False)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    return url
