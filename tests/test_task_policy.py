"""The node's task policy: the site, not the coordinator, decides what it releases.

At a study's first task the node pins the plan (sha256) and the feature columns; it then
refuses (TaskRefused, with the reason) a changed plan, a second statistics task, more
training tasks than the plan's rounds or one round twice, a second evaluation, an
evaluation of any model but the final one (any published one where the plan stops once
converged, after which the node trains no more), and feature ranges that are not its own. What
ran is kept in a file, so a restarted node remembers.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cardiofed.data.catalog import study_columns
from cardiofed.exceptions import TaskRefused
from cardiofed.node.task_policy import TaskPolicy, plan_digest
from cardiofed.protocol.schemas import TaskResponse
from cardiofed.simulation.config import SimulationConfig

NAMES, RANGES = study_columns("synthetic")
PLAN = SimulationConfig.create(rounds=3, seed=5, stop_patience=None,
                               dp_intercept_step=False).model_dump()
STOPPING = SimulationConfig.create(rounds=3, seed=5, stop_patience=1,
                                   dp_intercept_step=False).model_dump()
# A networked plan's default: training ends with the intercept step (version 4).
STEPPED = SimulationConfig.create(rounds=3, seed=5, stop_patience=None).model_dump()


def task(kind: str, round_number: int, model_version: int | None = None, *,
         study: str = "s1", plan: dict[str, object] | None = None,
         feature_names: list[str] | None = None,
         feature_ranges: list[tuple[float, float]] | None = None) -> TaskResponse:
    """A task as the coordinator sends it (training round n trains model version n - 1)."""
    if model_version is None:
        model_version = {"statistics": 0, "train": round_number - 1}.get(kind, 3)
    return TaskResponse(study=study, round=round_number, kind=kind, model_version=model_version,
                        deadline=datetime(2030, 1, 1, tzinfo=UTC), site_index=0,
                        plan=plan if plan is not None else PLAN,
                        feature_names=feature_names or NAMES,
                        feature_ranges=[list(r) for r in (feature_ranges or RANGES)])


def run(policy: TaskPolicy, t: TaskResponse) -> None:
    """What the node does with a task it accepts: admit it, (compute,) record it."""
    policy.admit(t, RANGES)
    policy.record(t)


def full_study(policy: TaskPolicy, study: str = "s1") -> None:
    run(policy, task("statistics", 0, study=study))
    for rnd in (1, 2, 3):
        run(policy, task("train", rnd, study=study))
    run(policy, task("evaluate", 4, 3, study=study))


@pytest.fixture
def policy(tmp_path: Path) -> TaskPolicy:
    return TaskPolicy(tmp_path / "state" / "tasks.json")


def test_the_planned_study_runs_through(policy: TaskPolicy) -> None:
    full_study(policy)

    assert policy.pinned("s1") == plan_digest(PLAN)
    assert policy.studies["s1"]["done"] == {"statistics": [0], "train": [1, 2, 3],
                                            "evaluate": [4]}
    assert policy.studies["s1"]["feature_names"] == NAMES


def test_plan_digest_is_sha256_of_the_canonical_plan() -> None:
    reordered = dict(reversed(list(PLAN.items())))

    assert re.fullmatch(r"[0-9a-f]{64}", plan_digest(PLAN))
    assert plan_digest(reordered) == plan_digest(PLAN)
    assert plan_digest({**PLAN, "lr": 0.5}) != plan_digest(PLAN)


def test_nothing_is_pinned_before_the_first_task_ran(policy: TaskPolicy) -> None:
    policy.admit(task("statistics", 0), RANGES)  # admitting alone records nothing

    assert policy.pinned("s1") is None
    assert not policy.path.exists()


def test_a_changed_plan_is_refused(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))
    changed = {**PLAN, "rounds": 30}

    with pytest.raises(TaskRefused, match=re.escape(
            f"Refused train task (round 1, model version 0) of study 's1': its plan (sha256 "
            f"{plan_digest(changed)[:12]}...) is not the plan this site pinned (sha256 "
            f"{plan_digest(PLAN)[:12]}...).")):
        policy.admit(task("train", 1, plan=changed), RANGES)
    # The same change anywhere in the plan: say a larger learning rate.
    with pytest.raises(TaskRefused, match="is not the plan this site pinned"):
        policy.admit(task("train", 1, plan={**PLAN, "lr": 5.0}), RANGES)
    policy.admit(task("train", 1), RANGES)  # the pinned plan still goes


def test_changed_feature_columns_are_refused(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))
    swapped = [NAMES[1], NAMES[0], *NAMES[2:]]

    with pytest.raises(TaskRefused, match=re.escape(
            "Refused train task (round 1, model version 0) of study 's1': its feature "
            "columns differ from the ones this site pinned.")):
        policy.admit(task("train", 1, feature_names=swapped,
                          feature_ranges=[RANGES[1], RANGES[0], *RANGES[2:]]), RANGES)


@pytest.mark.parametrize("kind", ["statistics", "train"])
def test_feature_ranges_other_than_the_sites_own_are_refused(policy: TaskPolicy,
                                                             kind: str) -> None:
    # The ranges set the statistics' bin edges: a coordinator narrowing one to isolate a
    # record must not get a release. They are the site's own, from its schema.
    narrowed = [(50.0, 51.0), *RANGES[1:]]
    rnd = 0 if kind == "statistics" else 1
    version = 0

    with pytest.raises(TaskRefused, match=re.escape(
            f"Refused {kind} task (round {rnd}, model version {version}) of study 's1': its "
            f"feature ranges (which set the statistics' bin edges) are not the schema's; "
            f"release parameters come from the site.")):
        policy.admit(task(kind, rnd, feature_ranges=narrowed), RANGES)
    policy.admit(task(kind, rnd, feature_ranges=narrowed))  # no own ranges: not checked


def test_a_second_statistics_task_is_refused(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))

    with pytest.raises(TaskRefused, match=re.escape(
            "Refused statistics task (round 0, model version 0) of study 's1': the plan has "
            "one statistics release, in round 0, and it already ran.")):
        policy.admit(task("statistics", 0), RANGES)


def test_a_statistics_task_outside_round_0_is_refused(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))
    for rnd in (1, 2):
        run(policy, task("train", rnd))

    with pytest.raises(TaskRefused, match=re.escape(
            "Refused statistics task (round 3, model version 0) of study 's1': the plan has "
            "one statistics release, in round 0, and it already ran.")):
        policy.admit(task("statistics", 3), RANGES)
    fresh = TaskPolicy(policy.path.with_name("other.json"))
    with pytest.raises(TaskRefused, match=re.escape(
            "Refused statistics task (round 2, model version 0) of study 's1': the plan has "
            "one statistics release, in round 0, and this is round 2.")):
        fresh.admit(task("statistics", 2), RANGES)


def test_the_same_training_round_twice_is_refused(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))
    run(policy, task("train", 1))

    with pytest.raises(TaskRefused, match=re.escape(
            "Refused train task (round 1, model version 0) of study 's1': this site already "
            "trained round 1.")):
        policy.admit(task("train", 1), RANGES)
    with pytest.raises(TaskRefused, match="this site already trained round 1"):
        policy.admit(task("train", 1, model_version=1), RANGES)  # another version, same round


def test_more_training_tasks_than_the_plans_rounds_are_refused(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))
    for rnd in (1, 2, 3):
        run(policy, task("train", rnd))

    with pytest.raises(TaskRefused, match=re.escape(
            "Refused train task (round 4, model version 3) of study 's1': the plan has 3 "
            "training rounds and this site ran 3.")):
        policy.admit(task("train", 4), RANGES)


def test_a_second_evaluation_is_refused(policy: TaskPolicy) -> None:
    full_study(policy)

    with pytest.raises(TaskRefused, match=re.escape(
            "Refused evaluate task (round 4, model version 3) of study 's1': the plan has one "
            "evaluation and it already ran.")):
        policy.admit(task("evaluate", 4, 3), RANGES)
    with pytest.raises(TaskRefused, match="the plan has one evaluation and it already ran"):
        policy.admit(task("evaluate", 5, 3), RANGES)


@pytest.mark.parametrize("version", [0, 1, 2, 4])
def test_an_evaluation_of_any_model_but_the_final_one_is_refused(policy: TaskPolicy,
                                                                  version: int) -> None:
    # Evaluating each intermediate model would release one evaluation per version.
    run(policy, task("statistics", 0))
    run(policy, task("train", 1))

    with pytest.raises(TaskRefused, match=re.escape(
            f"Refused evaluate task (round 2, model version {version}) of study 's1': the plan "
            f"evaluates only the final model, version 3.")):
        policy.admit(task("evaluate", 2, version), RANGES)


@pytest.mark.parametrize("version", [3, 5])
def test_a_tail_averaged_plan_evaluates_the_average_version_only(policy: TaskPolicy,
                                                                  version: int) -> None:
    averaged = SimulationConfig.create(rounds=3, seed=5, stop_patience=None,
                                       average_last=2, dp_intercept_step=False).model_dump()
    run(policy, task("statistics", 0, plan=averaged))
    with pytest.raises(TaskRefused, match=re.escape(
            f"Refused evaluate task (round 4, model version {version}) of study 's1': the plan "
            f"evaluates only the final model, version 4.")):
        policy.admit(task("evaluate", 4, version, plan=averaged), RANGES)
    policy.admit(task("evaluate", 4, 4, plan=averaged), RANGES)


def test_a_plan_that_stops_once_converged_evaluates_once_and_then_trains_no_more(
        policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0, plan=STOPPING))
    run(policy, task("train", 1, plan=STOPPING))
    run(policy, task("train", 2, plan=STOPPING))
    with pytest.raises(TaskRefused, match="publishes versions 1 to 3"):
        policy.admit(task("evaluate", 3, 0, plan=STOPPING), RANGES)
    with pytest.raises(TaskRefused, match="trained round 2, so the study's final model is "
                                          "version 2 or later"):
        policy.admit(task("evaluate", 3, 1, plan=STOPPING), RANGES)
    run(policy, task("evaluate", 3, 2, plan=STOPPING))  # converged at version 2
    with pytest.raises(TaskRefused, match="evaluated the study's model; the plan trains no "
                                          "further"):
        policy.admit(task("train", 3, plan=STOPPING), RANGES)
    with pytest.raises(TaskRefused, match="one evaluation and it already ran"):
        policy.admit(task("evaluate", 4, 3, plan=STOPPING), RANGES)


def test_a_stepped_plan_takes_one_intercept_step_of_the_last_trained_model(
        policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0, plan=STEPPED))
    for rnd in (1, 2, 3):
        run(policy, task("train", rnd, plan=STEPPED))
    with pytest.raises(TaskRefused, match=re.escape(
            "Refused intercept task (round 4, model version 2) of study 's1': the plan steps "
            "the intercept only of the last trained model, version 3.")):
        policy.admit(task("intercept", 4, 2, plan=STEPPED), RANGES)
    policy.admit(task("evaluate", 4, 3, plan=STEPPED), RANGES)  # no site was private
    run(policy, task("intercept", 4, 3, plan=STEPPED))
    with pytest.raises(TaskRefused, match=re.escape(
            "Refused evaluate task (round 5, model version 3) of study 's1': the plan "
            "evaluates only the final model, version 4.")):
        policy.admit(task("evaluate", 5, 3, plan=STEPPED), RANGES)
    with pytest.raises(TaskRefused, match=re.escape(
            "Refused intercept task (round 5, model version 3) of study 's1': the plan has "
            "one intercept step, before the evaluation, and it already ran.")):
        policy.admit(task("intercept", 5, 3, plan=STEPPED), RANGES)
    run(policy, task("evaluate", 5, 4, plan=STEPPED))
    assert policy.studies["s1"]["done"] == {"statistics": [0], "train": [1, 2, 3],
                                            "intercept": [4], "evaluate": [5]}
    # A coordinator that skipped the step gets none once the model was evaluated.
    run(policy, task("statistics", 0, study="s2", plan=STEPPED))
    run(policy, task("evaluate", 1, 4, study="s2", plan=STEPPED))
    with pytest.raises(TaskRefused, match=re.escape(
            "Refused intercept task (round 2, model version 3) of study 's2': the plan has "
            "one intercept step, before the evaluation, and the evaluation already ran.")):
        policy.admit(task("intercept", 2, 3, study="s2", plan=STEPPED), RANGES)


def test_an_intercept_task_of_a_plan_without_the_step_is_refused(policy: TaskPolicy) -> None:
    full_study(policy)

    with pytest.raises(TaskRefused, match=re.escape(
            "Refused intercept task (round 5, model version 3) of study 's1': the plan takes "
            "no intercept step.")):
        policy.admit(task("intercept", 5, 3), RANGES)


def test_an_unknown_task_kind_is_refused(policy: TaskPolicy) -> None:
    with pytest.raises(TaskRefused, match=re.escape(
            "Refused predict task (round 1, model version 0) of study 's1': unknown task "
            "kind.")):
        policy.admit(task("predict", 1, 0), RANGES)


def test_a_restarted_node_remembers_the_pinned_plan_and_what_ran(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))
    run(policy, task("train", 1))
    run(policy, task("train", 2))

    restarted = TaskPolicy(policy.path)

    assert restarted.pinned("s1") == plan_digest(PLAN)
    assert restarted.studies == policy.studies
    with pytest.raises(TaskRefused, match="is not the plan this site pinned"):
        restarted.admit(task("train", 3, plan={**PLAN, "rounds": 4}), RANGES)
    with pytest.raises(TaskRefused, match="the plan has one statistics release"):
        restarted.admit(task("statistics", 0), RANGES)
    with pytest.raises(TaskRefused, match="this site already trained round 2"):
        restarted.admit(task("train", 2), RANGES)
    run(restarted, task("train", 3))
    with pytest.raises(TaskRefused, match="the plan has 3 training rounds and this site ran 3"):
        TaskPolicy(policy.path).admit(task("train", 4), RANGES)
    run(restarted, task("evaluate", 4, 3))
    with pytest.raises(TaskRefused, match="the plan has one evaluation and it already ran"):
        TaskPolicy(policy.path).admit(task("evaluate", 4, 3), RANGES)


def test_the_record_is_written_atomically_as_json(policy: TaskPolicy) -> None:
    run(policy, task("statistics", 0))

    saved = json.loads(policy.path.read_text(encoding="utf-8"))
    assert saved == {"s1": {"plan_sha256": plan_digest(PLAN), "feature_names": NAMES,
                            "done": {"statistics": [0]}}}
    assert sorted(p.name for p in policy.path.parent.iterdir()) == ["tasks.json"]


def test_each_study_pins_its_own_plan(policy: TaskPolicy) -> None:
    full_study(policy, "s1")
    other_plan = {**PLAN, "rounds": 2}

    run(policy, task("statistics", 0, study="s2", plan=other_plan))
    run(policy, task("train", 1, study="s2", plan=other_plan))

    assert policy.pinned("s2") == plan_digest(other_plan) != policy.pinned("s1")
    with pytest.raises(TaskRefused, match="is not the plan this site pinned"):
        policy.admit(task("train", 2, study="s2"), RANGES)


@pytest.mark.parametrize("content", ["{not json", ""])
def test_a_corrupt_task_record_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(TaskRefused, match=re.escape(
            f"Task record {path} is corrupt (")) as refusal:
        TaskPolicy(path)
    assert str(refusal.value).endswith("refusing to guess which tasks already ran.")
