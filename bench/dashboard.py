"""Server time of the dashboard's and the calculator's pages at the issue's size.

One study of 200 sites with 50 model versions, each evaluated by every site (AUC with an
interval), 52 rounds, the last one's 200 updates, on SQLite; each page is requested
``--repeats`` times in-process (the ASGI app without a network: what is measured is the
server's work) after one warm-up request. Writes bench/results/dashboard.{json,md}.

    python bench/dashboard.py [--sites 200] [--versions 50] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402

TARGET_MS = 300.0


def build(url: str, n_sites: int, versions: int) -> str:
    """The study; returns the admin credential."""
    import numpy as np

    from cardiofed.coordinator import administration, studies
    from cardiofed.data.catalog import study_columns
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.store import (
        ModelVersion,
        Round,
        Study,
        Update,
        make_engine,
        make_sessionmaker,
        utcnow,
    )

    sessions = make_sessionmaker(make_engine(url))
    names, ranges = study_columns("synthetic")
    sites = [f"site_{i:03d}" for i in range(n_sites)]
    rng = np.random.default_rng(0)
    with sessions() as db:
        admin = administration.create_admin_key(db)
        key = administration.authenticate_admin(db, admin)
        administration.create_study(db, study_id="national", plan=SimulationConfig(rounds=versions),
                             sites=sites, feature_names=names, feature_ranges=ranges,
                             by=(key, "bench"))
        now = utcnow()
        for v in range(1, versions + 1):
            auc = rng.uniform(0.65, 0.8, n_sites)
            db.add(ModelVersion(study_id="national", version=v, weights=b"", sha256="0" * 64,
                                round_number=v, participants=sites, created_at=now,
                                metrics={s: {"auc": a, "auc_low": a - 0.03, "auc_high": a + 0.03,
                                             "epsilon_spent": 0.5}
                                         for s, a in zip(sites, auc.tolist(), strict=True)}))
            db.add(Round(study_id="national", number=v, kind="train", model_version=v - 1,
                         opened_at=now, closed_at=now, deadline=now + timedelta(hours=1),
                         outcome="closed"))
        last = Round(study_id="national", number=versions + 1, kind="train",
                     model_version=versions, opened_at=now,
                     deadline=now + timedelta(hours=1))
        db.add(last)
        study = db.get(Study, "national")
        assert study is not None
        study.phase, study.current_round, study.model_version = "train", versions + 1, versions
        db.flush()
        site_ids = [s.id for s in studies.active_sites(db, study)]
        for site_id in site_ids:
            db.add(Update(round_id=last.id, site_id=site_id, payload=b"x", sha256="1" * 64,
                          num_samples=100, received_at=now))
        db.commit()
    return admin


def timed(client, path: str, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    assert client.get(path).status_code == 200, path  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t0) * 1e3)
        assert response.status_code == 200, (path, response.status_code)
    times.sort()
    return {"median_ms": statistics.median(times),
            "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))],
            "bytes": len(response.content)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.sites, args.versions, args.repeats = 4, 2, 1
    from fastapi.testclient import TestClient

    from cardiofed.coordinator.app import create_app
    from cardiofed.coordinator.deps import app_settings
    from cardiofed.coordinator.settings import CoordinatorSettings
    from cardiofed.serving import provenance, registry
    from cardiofed.serving.app import create_serving_app
    from cardiofed.serving.keys import create_key
    from cardiofed.serving.settings import ServingSettings

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/dashboard.db"
        admin = build(url, args.sites, args.versions)
        app = create_app()
        app.dependency_overrides[app_settings] = lambda: CoordinatorSettings(database_url=url)
        client = TestClient(app)
        assert client.post("/ui/login", data={"credential": admin}).status_code == 200
        pages = {"/ui (studies)": "/ui", "/ui/studies/national": "/ui/studies/national",
                 "/ui/audit": "/ui/audit"}
        results = {name: timed(client, path, args.repeats) for name, path in pages.items()}

        from cardiofed.data.synthetic import synthetic_federation
        from cardiofed.simulation.config import SimulationConfig
        from cardiofed.simulation.experiment import run_experiment

        data = synthetic_federation(n_sites=4, seed=1, size_scale=0.3)
        run = run_experiment(data, SimulationConfig.create(rounds=2, eval_every=0),
                             baselines=False)
        model = provenance.from_experiment(run, study="national",
                                           feature_names=data.feature_names,
                                           outcome=data.outcome)
        serving_url = f"sqlite:///{tmp}/serving.db"
        from cardiofed.store import session_factory

        with session_factory(serving_url)() as db:
            registry.register(db, model, promote=True)
            create_key(db, "bench", ["score"], 10**6)
        serving = TestClient(create_serving_app(ServingSettings(database_url=serving_url)))
        results["/calculator"] = timed(serving, "/calculator", args.repeats)

    slowest = max(r["median_ms"] for r in results.values())
    rows = [[name, r["median_ms"], r["p95_ms"], r["bytes"]] for name, r in results.items()]
    md = (f"## Dashboard pages: {args.sites} sites, {args.versions} model versions\n\n"
          + markdown_table(["page", "median ms", "p95 ms", "bytes"], rows, 1)
          + f"\n\nSlowest page median {slowest:.0f} ms (target < {TARGET_MS:.0f} ms: "
          f"{'met' if slowest < TARGET_MS else 'missed'}).\n")
    write_results("dashboard", {"sites": args.sites, "versions": args.versions,
                                "repeats": args.repeats, "pages": results}, md)


if __name__ == "__main__":
    main()
