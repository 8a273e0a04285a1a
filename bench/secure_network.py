"""Secure rounds over loopback: a secure study's round against plain rounds, same sites.

A real coordinator process (``cardiofed coordinator --insecure``; ``bench/network.py``'s
:class:`Coordinator`) on 127.0.0.1, and N hospital nodes (:class:`NodeAgent` objects in
threads of one process, each with its own client, state directory and privacy ledger)
that poll it. Three studies of the same plan on the same sites, each on its own
coordinator:

* **secure**: ``secure_aggregation = true``; the statistics round and each training
  round are one secure sum in four steps (advertise, share keys, masked input, reveal),
  each node adding its share of the distributed noise from its own budget;
* **secure, signed**: the same, with every node holding the federation's roster: signed
  advertisements, and a fifth step in each sum (each site signs the survivor list);
* **secure, groups of 3**: the same as secure, with each training round one secure sum
  per group of at least 3 sites and the weighted median across the groups;
* **plain, private**: the default node (DP-SGD at each site, its own noise), each update
  sent in the clear;
* **plain, exact**: nodes with ``privacy = "off"``.

Per round: the coordinator's own record of each training round (``opened_at`` to
``closed_at``), mean over the rounds. The secure round's parts (key advertisement to
the unmasked sum) are all inside that interval.

    python bench/secure_network.py [--sites 10 50 200] [--rounds 3] [--poll-wait 1]
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402
from network import SETTINGS, STUDY_LIMIT_S, Coordinator, _seconds, run_nodes  # noqa: E402

ARMS = {"secure": {"secure_aggregation": True},
        "secure, signed": {"secure_aggregation": True},  # nodes with a roster
        "secure, groups of 3": {"secure_aggregation": True, "secure_group_size": 3},
        "plain, private": {}, "plain, exact": {}}
GROUPED_MIN_SITES = 9  # three groups of 3


def study(workdir: Path, arm: str, n_sites: int, size_scale: float, rounds: int,
          poll_wait_s: float) -> dict[str, Any]:
    """One study of `arm` on N synthetic sites; the coordinator's round times."""
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig

    data = synthetic_federation(n_sites=n_sites, seed=0, size_scale=size_scale)
    names = [s.name for s in data.sites]
    plan = {**SETTINGS, "rounds": rounds, **ARMS[arm]}
    tag = re.sub(r"[^a-z0-9]+", "-", arm)
    coordinator = Coordinator(workdir, f"{tag}-{n_sites}")
    agents: list[NodeAgent] = []
    try:
        tokens = coordinator.create_study("bench", names, plan)
        roster = _roster(workdir / f"{tag}-{n_sites}", names) if arm == "secure, signed" \
            else None
        for name in names:
            privacy: dict[str, Any] = {"privacy": "off"} if arm == "plain, exact" else {}
            if roster is not None:
                privacy["roster"] = str(roster)
            agent = NodeAgent(NodeConfig.create(
                coordinator_url=coordinator.url,
                state_dir=str(workdir / f"{tag}-{n_sites}" / name),
                enrolment_token=tokens[name], poll_wait_s=poll_wait_s,
                data={"dataset": "synthetic", "site": name, "seed": 0}, **privacy))
            agent._site = data.site(name)  # loaded once (as bench/network.py does)
            agents.append(agent)
        wall = run_nodes(agents, STUDY_LIMIT_S)
        state = coordinator.status("bench")
        if state["phase"] != "done":
            raise RuntimeError(f"{arm} N={n_sites}: the study ended in {state}")
        records = coordinator.rounds("bench")
        train = [_seconds(o, c) for _, kind, o, c in records if kind == "train"]
        return {"arm": arm, "n_sites": n_sites, "rounds": rounds,
                "train_round_s": train, "train_round_s_mean": statistics.fmean(train),
                "statistics_round_s": [_seconds(o, c) for _, kind, o, c in records
                                       if kind == "statistics"][0],
                # the final evaluation: a secure sum of score histograms, or each
                # site's own release in the clear
                "evaluation_round_s": [_seconds(o, c) for _, kind, o, c in records
                                       if kind == "evaluate"][-1],
                "study_wall_s": wall, "refusals": len(state["refusals"]),
                "last_outcome": state["round_outcome"],
                "coordinator_5xx": coordinator.server_errors()}
    finally:
        for a in agents:
            a.client.close()
        coordinator.stop()


def _roster(folder: Path, names: list[str]) -> Path:
    """Each site's signing key in its state directory, and the roster of them all."""
    from cardiofed.secure.identity import IDENTITY_KEY, identity_key, roster_line

    lines = [roster_line(name, identity_key(folder / name / IDENTITY_KEY)) for name in names]
    path = folder / "roster.toml"
    path.write_text("[sites]\n" + "\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll-wait", type=float, default=1.0)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.sites, args.rounds, args.poll_wait = [3], 1, 0.2
        args.arms = ["secure", "secure, signed", "plain, exact"]
    single_threaded()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    with tempfile.TemporaryDirectory(prefix="cardiofed-bench-") as tmp:
        for n in args.sites:
            scale = min(1.0, 30 / n)  # about the same rows in all: the protocol's cost
            for arm in args.arms:
                if arm == "secure, groups of 3" and n < GROUPED_MIN_SITES:
                    continue
                runs.append({**study(Path(tmp), arm, n, scale, args.rounds, args.poll_wait),
                             "size_scale": scale})
                print(arm, n, f"{runs[-1]['train_round_s_mean']:.2f} s/round", flush=True)
    by = {(r["arm"], r["n_sites"]): r["train_round_s_mean"] for r in runs}

    def mean(arm: str, n: int) -> float:
        return by.get((arm, n), float("nan"))

    def evaluation(arm: str, n: int) -> float:
        return next((r["evaluation_round_s"] for r in runs
                     if (r["arm"], r["n_sites"]) == (arm, n)), float("nan"))

    rows = [[n, mean("secure", n), mean("plain, private", n), mean("plain, exact", n),
             mean("secure", n) / mean("plain, private", n),
             mean("secure", n) / mean("plain, exact", n),
             next(r["statistics_round_s"] for r in runs
                  if (r["arm"], r["n_sites"]) == ("secure", n)),
             evaluation("secure", n), evaluation("plain, private", n),
             evaluation("plain, exact", n)] for n in args.sites]
    notes = [
        f"Logistic regression, {args.rounds} training rounds, synthetic sites "
        f"(size_scale min(1, 30 / N)). Seconds per training round: the coordinator's own "
        f"records (opened_at to closed_at), mean over the rounds. Secure: the round's "
        f"four steps, each node's clipped gradient sum with its noise share; plain, "
        f"private: DP-SGD at each node, updates in the clear; plain, exact: privacy = "
        f"\"off\". The evaluation round, once after training: secure, one secure sum of "
        f"the sites' score histograms with their noise shares; plain, private, each site's "
        f"noisy histograms; plain, exact, each site's metrics.",
        "Environment: one coordinator process (uvicorn, SQLite in WAL mode) per study on "
        "127.0.0.1; the N nodes are NodeAgent threads of one process, long-polling with "
        f"wait={args.poll_wait:g} s, sharing the same 2 cores and one GIL.",
        f"Refusals: {sum(r['refusals'] for r in runs)}; coordinator 5xx responses: "
        f"{sum(r['coordinator_5xx'] for r in runs)}.",
    ]
    variants = [[n, mean("secure", n), mean("secure, signed", n),
                 mean("secure, groups of 3", n),
                 mean("secure, signed", n) / mean("secure", n),
                 mean("secure, groups of 3", n) / mean("secure", n)] for n in args.sites]
    md = ("## Secure rounds over loopback\n\n"
          + markdown_table(["N sites", "secure s/round", "plain private s/round",
                            "plain exact s/round", "secure / plain private",
                            "secure / plain exact", "secure statistics round s",
                            "secure evaluation round s", "plain private evaluation round s",
                            "plain exact evaluation round s"], rows)
          + "\nThe secure round signed (nodes with the roster: signed advertisements and "
            "survivor lists, five steps) and in groups of 3 (a sum per group, the weighted "
            f"median across them; from {GROUPED_MIN_SITES} sites), seconds per training "
            "round:\n\n"
          + markdown_table(["N sites", "secure s/round", "signed s/round",
                            "groups of 3 s/round", "signed / secure",
                            "groups of 3 / secure"], variants)
          + "\n" + "\n\n".join(notes) + "\n")
    write_results("secure_network", {"settings": {**SETTINGS, "rounds": args.rounds,
                                                  "poll_wait_s": args.poll_wait},
                                     "runs": runs, "notes": notes}, md)


if __name__ == "__main__":
    main()
