"""The site, not the coordinator, decides what it releases.

At the first task of a study the node pins the study plan (the SHA-256 of its canonical
JSON) and the feature columns. Every later task must carry the same plan, and the node
runs at most: one statistics task (round 0), ``plan.rounds`` training tasks, each
round at most once, one intercept step of the last trained model where the plan takes
it, and one evaluation, of the final published model (version ``plan.rounds``, one more
for ``average_last`` and one more for the intercept step; an earlier one where the plan
stops once converged), after which it trains no more. Release parameters come from the
site, never from the task: the statistics' bin edges from the schema's (or the reference
data set's) plausible ranges, so a task whose ranges differ is refused. An attribution
study's steps are bounded by :data:`ATTRIBUTION_RELEASES`. What the node ran is kept in a
JSON file in its state directory; a site with a privacy budget is additionally bounded by
its ledger, which lives elsewhere and survives a deleted state directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cardiofed.causal.propensity import MAX_NEWTON
from cardiofed.exceptions import CardioFedError, TaskRefused
from cardiofed.protocol.schemas import TaskResponse
from cardiofed.simulation.config import SimulationConfig
from cardiofed.survival.cox import MAX_HALVINGS

# What one site releases for an attribution study at most: its steps
# (cardiofed.causal.study) over ATTRIBUTION_STARTS starts (the analysis restarts when a
# site leaves it), each start at most MAX_NEWTON Newton steps.
ATTRIBUTION_STARTS = 3
ATTRIBUTION_RELEASES = {"moments": ATTRIBUTION_STARTS, "newton": ATTRIBUTION_STARTS * MAX_NEWTON,
                        "estimate": ATTRIBUTION_STARTS, "sandwich": ATTRIBUTION_STARTS}
# A survival study (cardiofed.survival.study): each start one round of counts, at most 100
# Newton steps, each halved at most MAX_HALVINGS times, and one round to begin; stratified,
# one round of the site's own baseline at the fit; with evaluate, one round of figures.
SURVIVAL_RELEASES = {"km": ATTRIBUTION_STARTS,
                     "cox": ATTRIBUTION_STARTS * (100 * (MAX_HALVINGS + 1) + 1),
                     "baseline": ATTRIBUTION_STARTS, "assess": ATTRIBUTION_STARTS}
ANALYSIS_RELEASES = {**ATTRIBUTION_RELEASES, **SURVIVAL_RELEASES}


# The smallest batch a non-private node trains on unless it opted in: a gradient of one
# record's batch is that record, nearly in the clear.
MIN_EXACT_BATCH = 16
OptIn = Literal["small_batches", "exact_attribution", "exact_survival"]


def check_exact_releases(plan: SimulationConfig, *, private: bool,
                         opt_in: Sequence[str] = ()) -> None:
    """Raise :class:`TaskRefused` for a plan whose exact releases would expose single
    records, unless the site opted in by name: batches below :data:`MIN_EXACT_BATCH`, and
    attribution and Cox sums (whose coefficients the coordinator chooses). A private
    site's releases carry noise whatever the plan; one that has none (Cox sums) is refused
    by the node."""
    if private:
        return
    if plan.attribution is not None and "exact_attribution" not in opt_in:
        raise TaskRefused("This site is not private (privacy = \"off\"): its attribution "
                          "sums would be exact, and a coordinator's coefficients can make "
                          "them single records. It takes part only if its config opts in "
                          "(opt_in = [\"exact_attribution\"]).")
    if plan.survival is not None and "exact_survival" not in opt_in:
        raise TaskRefused("This site is not private (privacy = \"off\"): its Cox sums "
                          "would be exact, and a coordinator's coefficients and grid shape "
                          "what they reveal. It takes part only if its config opts in "
                          "(opt_in = [\"exact_survival\"]).")
    if plan.analysis is None and plan.batch_size < MIN_EXACT_BATCH \
            and "small_batches" not in opt_in:
        raise TaskRefused(f"The plan's batch_size {plan.batch_size} is below "
                          f"{MIN_EXACT_BATCH}: this site's exact updates would expose "
                          f"single records. It takes part only if its config opts in "
                          f"(opt_in = [\"small_batches\"]).")


def plan_digest(plan: dict[str, Any]) -> str:
    """SHA-256 of a plan's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def planned_releases(kind: str, rounds: int) -> int:
    """How many tasks of `kind` a study plan of `rounds` rounds has for one site."""
    return rounds if kind == "train" else 1


def _can_stop_early(plan: dict[str, Any]) -> bool:
    """Whether the plan stops once converged, so that its final model may come before
    version ``rounds``; the one evaluation then ends the site's part in the study."""
    try:
        return SimulationConfig.create(**plan).stopping_rule() is not None
    except CardioFedError:
        return False


def _trained_versions(plan: dict[str, Any]) -> int:
    """The version training ends on: ``rounds``, one more with ``average_last`` (the mean
    of the last rounds' models)."""
    return int(plan.get("rounds", 0)) + (int(plan.get("average_last", 1)) > 1)


def _intercept_step(plan: dict[str, Any]) -> bool:
    """Whether a networked plan ends training with the intercept step."""
    try:
        return SimulationConfig.create(**plan).intercept_step_for(True)
    except CardioFedError:
        return False


class TaskPolicy:
    """The node's record of the plans it pinned and the tasks it ran, at `path`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.studies: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.studies = dict(json.loads(self.path.read_text(encoding="utf-8")))
            except ValueError as exc:
                raise TaskRefused(f"Task record {self.path} is corrupt ({exc}); refusing to "
                                  f"guess which tasks already ran.") from None

    def pinned(self, study: str) -> str | None:
        """The plan digest pinned for `study`, if any."""
        entry = self.studies.get(study)
        return None if entry is None else str(entry["plan_sha256"])

    def admit(self, task: TaskResponse,
              own_ranges: list[tuple[float, float]] | None = None) -> None:
        """Raise :class:`TaskRefused` (naming the reason) unless `task` is in the plan."""
        digest = plan_digest(task.plan)
        entry = self.studies.get(task.study)
        where = f"{task.kind} task (round {task.round}, model version {task.model_version})"
        if entry is not None:
            if entry["plan_sha256"] != digest:
                raise TaskRefused(f"Refused {where} of study {task.study!r}: its plan (sha256 "
                                  f"{digest[:12]}...) is not the plan this site pinned "
                                  f"(sha256 {str(entry['plan_sha256'])[:12]}...).")
            if entry["feature_names"] != task.feature_names:
                raise TaskRefused(f"Refused {where} of study {task.study!r}: its feature "
                                  f"columns differ from the ones this site pinned.")
        if own_ranges is not None and [tuple(r) for r in task.feature_ranges] != [
                (float(lo), float(hi)) for lo, hi in own_ranges]:
            raise TaskRefused(f"Refused {where} of study {task.study!r}: its feature ranges "
                              f"(which set the statistics' bin edges) are not the schema's; "
                              f"release parameters come from the site.")
        done = (entry or {}).get("done", {})
        rounds = int(task.plan.get("rounds", 0))  # type: ignore[call-overload]
        if task.kind == "statistics":
            if task.round != 0 or done.get("statistics"):
                why = "it already ran" if done.get("statistics") else f"this is round {task.round}"
                raise TaskRefused(f"Refused {where} of study {task.study!r}: the plan has one "
                                  f"statistics release, in round 0, and {why}.")
        elif task.kind == "train":
            trained = done.get("train", [])
            if task.round in trained:
                raise TaskRefused(f"Refused {where} of study {task.study!r}: this site already "
                                  f"trained round {task.round}.")
            if done.get("evaluate"):
                raise TaskRefused(f"Refused {where} of study {task.study!r}: this site "
                                  f"evaluated the study's model; the plan trains no further.")
            if len(trained) >= planned_releases("train", rounds):
                raise TaskRefused(f"Refused {where} of study {task.study!r}: the plan has "
                                  f"{rounds} training rounds and this site ran {len(trained)}.")
        elif task.kind == "intercept":
            if not _intercept_step(task.plan):
                raise TaskRefused(f"Refused {where} of study {task.study!r}: the plan takes no "
                                  f"intercept step.")
            if done.get("intercept") or done.get("evaluate"):
                raise TaskRefused(f"Refused {where} of study {task.study!r}: the plan has one "
                                  f"intercept step, before the evaluation, and "
                                  f"{'it' if done.get('intercept') else 'the evaluation'} "
                                  f"already ran.")
            self._check_final(task, where, done, _trained_versions(task.plan),
                              "steps the intercept only of the last trained model")
        elif task.kind == "evaluate":
            if done.get("evaluate"):
                raise TaskRefused(f"Refused {where} of study {task.study!r}: the plan has one "
                                  f"evaluation and it already ran.")
            # The intercept step stores one more version, the final model. A plan that may
            # take it (its coordinator does when a site is private) evaluates either the
            # last trained version or that one, unless this site took part in the step.
            last_trained = _trained_versions(task.plan)
            stepped = done.get("intercept") or (_intercept_step(task.plan)
                                                and task.model_version != last_trained)
            self._check_final(task, where, done, last_trained + bool(stepped),
                              "evaluates only the final model")
        elif task.kind in ANALYSIS_RELEASES:
            ran = done.get(task.kind, [])
            limit = ANALYSIS_RELEASES[task.kind]
            if task.round in ran:
                raise TaskRefused(f"Refused {where} of study {task.study!r}: this site already "
                                  f"ran round {task.round}.")
            if len(ran) >= limit:
                raise TaskRefused(f"Refused {where} of study {task.study!r}: an analysis "
                                  f"has at most {limit} {task.kind} releases "
                                  f"({ATTRIBUTION_STARTS} starts) and this site ran {len(ran)}.")
        else:
            raise TaskRefused(f"Refused {where} of study {task.study!r}: unknown task kind.")

    @staticmethod
    def _check_final(task: TaskResponse, where: str, done: dict[str, Any], final: int,
                     what: str) -> None:
        """Refuse a task on any model but version `final` (an earlier one where the plan
        stops once converged, never before the last round trained)."""
        if not _can_stop_early(task.plan) and task.model_version != final:
            raise TaskRefused(f"Refused {where} of study {task.study!r}: the plan {what}, "
                              f"version {final}.")
        if not 1 <= task.model_version <= final:
            raise TaskRefused(f"Refused {where} of study {task.study!r}: the plan "
                              f"publishes versions 1 to {final}.")
        last = max(done.get("train", []), default=0)
        if task.model_version < last:
            raise TaskRefused(f"Refused {where} of study {task.study!r}: this site "
                              f"trained round {last}, so the study's final model is "
                              f"version {last} or later.")

    def record(self, task: TaskResponse) -> None:
        """Remember that `task` ran (pinning the plan at the study's first task)."""
        entry = self.studies.setdefault(task.study, {
            "plan_sha256": plan_digest(task.plan), "feature_names": list(task.feature_names),
            "done": {}})
        entry["done"].setdefault(task.kind, []).append(task.round)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.studies, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
