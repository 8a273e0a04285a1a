"""Memory and time of closing one training round of 36,000 updates, by aggregation rule.

A coordinator database (SQLite in a temporary folder) holds one study of ``--sites``
sites whose first training round has every site's update (random deltas of the
model's tensors and a sample size, inserted directly: the uploads are not what is
measured, ``bench/network_scale.py`` measures them). The round is then closed by the
coordinator's own code (:func:`cardiofed.coordinator.rounds.advance`, its deadline
passed), under ``tracemalloc``: the peak of Python allocations during the close, and
its seconds.

The robust mean (and the plain mean) streams: each payload is checked and its norm
taken in one pass, and the aggregate is a running sum over the payloads read again 500
at a time. The coordinate-wise median, the weighted median (the networked default),
trimmed mean, Krum and centered clipping need every update at once.

    python bench/streaming_close.py [--sites 36000] [--models logistic mlp]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402


def close_round(workdir: Path, n_sites: int, model: str, rule: str) -> dict[str, Any]:
    from sqlalchemy import insert, select

    from cardiofed.coordinator import administration, models, rounds
    from cardiofed.data.catalog import study_columns
    from cardiofed.data.preprocessing import (
        DEFAULT_BINS,
        bin_edges,
        merge_statistics,
        site_statistics,
    )
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.store import (
        TALLY_SHARDS,
        ReportTally,
        Round,
        Site,
        Study,
        Update,
        make_engine,
        make_sessionmaker,
        sha256,
        utcnow,
    )
    from cardiofed.wire import encode_arrays

    names, ranges = study_columns("synthetic")
    plan = SimulationConfig.create(model=model, rounds=1, seed=0, robust_rule=rule)
    engine = make_engine(f"sqlite:///{workdir}/{model}-{rule}.db")
    sites = [f"site{i:05d}" for i in range(n_sites)]
    rng = np.random.default_rng(0)
    with make_sessionmaker(engine)() as db:
        administration.create_study(db, study_id="national", plan=plan, sites=sites,
                             feature_names=names, feature_ranges=ranges)
        study = db.get(Study, "national")
        assert study is not None
        rows = rng.uniform([lo for lo, _ in ranges], [hi for _, hi in ranges], (200, len(names)))
        pre = merge_statistics([site_statistics(rows, bin_edges(ranges, DEFAULT_BINS))],
                               bin_edges(ranges, DEFAULT_BINS), names)
        study.preprocessor = encode_arrays(pre.to_arrays())
        first = db.scalar(select(Round).where(Round.study_id == "national"))
        assert first is not None
        first.closed_at = utcnow()
        train = Round(study_id="national", number=1, kind="train", model_version=0,
                      opened_at=utcnow(), deadline=utcnow() - timedelta(seconds=1))
        db.add(train)
        study.phase, study.current_round = "train", 1
        db.flush()
        shapes = {k: v.shape for k, v in models.load_model(db, study, 0).items()}
        ids = {name: i for name, i in db.execute(
            select(Site.name, Site.id).where(Site.study_id == "national"))}
        for start in range(0, n_sites, 2000):
            batch = sites[start:start + 2000]
            db.execute(insert(Update), [{
                "round_id": train.id, "site_id": ids[name], "num_samples": int(n),
                "payload": (payload := encode_arrays(
                    {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()},
                    {"study": "national", "round": "1", "model_version": "0", "site": name,
                     "num_samples": str(int(n)), "train_loss": "0.5"})),
                "sha256": sha256(payload), "received_at": utcnow()}
                for name, n in zip(batch, rng.integers(20, 5000, len(batch)), strict=True)])
        db.execute(insert(ReportTally), [{"round_id": train.id, "shard": s,
                                          "reports": sum(1 for i in ids.values()
                                                         if i % TALLY_SHARDS == s)}
                                         for s in range(TALLY_SHARDS)])
        db.commit()
        parameters = int(sum(np.prod(s) for s in shapes.values()))
    with make_sessionmaker(engine)() as db:
        study = db.get(Study, "national")
        assert study is not None
        tracemalloc.start()
        start_s = time.perf_counter()
        rounds.advance(db, study)
        seconds = time.perf_counter() - start_s
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert study.model_version == 1, study.phase
    engine.dispose()
    return {"sites": n_sites, "model": model, "parameters": parameters, "rule": rule,
            "close_s": seconds, "peak_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=36_000)
    parser.add_argument("--models", nargs="+", default=["logistic", "mlp"])
    parser.add_argument("--rules", nargs="+", default=["mean", "median"])
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.sites, args.models = 20, ["logistic"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for rule in args.rules:
                runs.append(close_round(Path(tmp), args.sites, model, rule))
                print(runs[-1], flush=True)
    table = markdown_table(["sites", "model", "parameters", "rule", "close s",
                            "peak Python MB during the close"],
                           [[r["sites"], r["model"], r["parameters"], r["rule"], r["close_s"],
                             r["peak_mb"]] for r in runs])
    write_results("streaming_close", {"runs": runs}, table)
    print(table)


if __name__ == "__main__":
    main()
