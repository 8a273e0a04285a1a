"""The hospital node: polls the coordinator for tasks, runs them locally, uploads results.

Only outbound requests. Every payload is cached on disk before it is sent and logged
in the outbound log; after a crash or restart the node re-sends a cached payload
byte for byte (the coordinator acknowledges the retry), so no round is trained twice
and no privacy is spent twice.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from pydantic import BaseModel

from cardiofed.causal.study import AttributionPlan, SiteArrays, check_state, release, site_step
from cardiofed.data.dataset import SiteData
from cardiofed.data.preprocessing import PRIVATE_BINS, Preprocessor, bin_edges
from cardiofed.data.study_features import StudyFeatures, catalogue_of
from cardiofed.exceptions import (
    CardioFedError,
    PrivacyBudgetExceeded,
    RoundClosed,
    StaleUpdateRefused,
    TaskRefused,
)
from cardiofed.models.kinds import Weights
from cardiofed.node.config import DataSource, NodeConfig
from cardiofed.node.outbound import OutboundLog
from cardiofed.node.relay import RegionRelay
from cardiofed.node.secure_rounds import SecureRounds
from cardiofed.node.task_policy import TaskPolicy, check_exact_releases, planned_releases
from cardiofed.node.transport import NodeError, send
from cardiofed.node.work import (
    attribution_site,
    evaluate_payload,
    intercept_payload,
    load_site_data,
    own_feature_ranges,
    risks_on_test_split,
    site_preprocessor,
    statistics_payload,
    study_weights,
    survival_rows,
    train_payload,
)
from cardiofed.privacy.budget import PrivacyLedger, open_site_ledger
from cardiofed.privacy.release_gate import bounded_rows
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.protocol.schemas import TaskResponse
from cardiofed.protocol.secure_sums import vector_length
from cardiofed.schema import Catalogue
from cardiofed.secure.identity import IDENTITY_KEY, SiteIdentity, identity_key, read_roster
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.secure_attribution import attribution_length, attribution_vector
from cardiofed.simulation.secure_evaluation import evaluation_vector
from cardiofed.simulation.secure_runner import gradient_vector
from cardiofed.simulation.secure_statistics import statistics_vector
from cardiofed.survival.study import SurvivalPlan
from cardiofed.survival.study import site_step as survival_step
from cardiofed.wire import encode_arrays

log = logging.getLogger("cardiofed.node")


class NodeAgent:
    """Runs one site's part of a study. ``client`` may be any ``httpx.Client`` (tests pass
    one over an in-process ASGI transport)."""

    def __init__(self, config: NodeConfig, client: httpx.Client | None = None,
                 region_client: httpx.Client | None = None) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.client = client or httpx.Client(
            base_url=config.coordinator_url, timeout=config.poll_wait_s + 30,
            verify=ssl.create_default_context(cafile=str(config.ca_file)) if config.ca_file
            else True)
        self.outbound = OutboundLog(self.state_dir / "outbound.jsonl")
        self.policy = TaskPolicy(self.state_dir / "tasks.json")
        self._site: SiteData | None = None
        self._rows: SiteArrays | None = None  # an attribution study's
        # a survival study's rows: all, or the training or held-out part
        self._survival_rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._pre: Preprocessor | None = None
        self._weights: tuple[tuple[str, int], Weights] | None = None  # the last version's
        self._privacy: SitePrivacy | None = None
        self._name: str | None = None
        # the secure sums under way (their keys: memory only); with a roster, signed
        self.secure = SecureRounds(None if config.roster is None else SiteIdentity(
            identity_key(self.state_dir / IDENTITY_KEY), read_roster(config.roster)))
        self.region = None if config.region is None else RegionRelay(
            config.region, region_client, config.retry_max_delay_s)
        # The hospital's one ledger, opened (and verified) before anything runs: a
        # missing, moved or edited ledger stops the node here.
        self.ledger: PrivacyLedger | None = None
        if config.private is not None:
            ledger_dir, seal_file = config.ledger_location()
            self.ledger = open_site_ledger(site="this site", budget=config.private.budget(),
                                           ledger_dir=ledger_dir, seal_file=seal_file)

    # -- credentials ---------------------------------------------------------------
    @property
    def _credential_file(self) -> Path:
        return self.state_dir / "credential"

    def credential(self) -> str:
        if self._credential_file.exists():
            return self._credential_file.read_text().strip()
        if not self.config.enrolment_token:
            raise NodeError("No credential yet and no enrolment_token in the node config.")
        body = self._request("POST", "/v1/enrol", json={"token": self.config.enrolment_token},
                             auth=False).json()
        fd = os.open(self._credential_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(body["credential"])
        log.info("enrolled as site %s of study %s", body["site"], body["study"])
        return str(body["credential"])

    def _request(self, method: str, url: str, *, auth: bool = True, retries: int = 30,
                 **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.credential()}"} if auth else {}
        return send(self.client, method, url, headers=headers, retries=retries,
                    max_delay_s=self.config.retry_max_delay_s, **kwargs)

    # -- the loop ------------------------------------------------------------------
    def run(self, *, max_tasks: int | None = None) -> int:
        """Work until the study is done (or `max_tasks` tasks ran); returns tasks run.
        A region's node counts each look at a regional round still waiting as a task run."""
        done = 0
        while max_tasks is None or done < max_tasks:
            asked = time.monotonic()
            response = self._request("GET", "/v1/tasks/next",
                                     params={"wait": self.config.poll_wait_s})
            if response.status_code == 204:
                if time.monotonic() - asked < 0.5:  # no long-poll here: do not hammer
                    time.sleep(0.5)
                phase = response.headers.get("x-study-phase")
                study = self._study_id()
                if phase is None and study:  # a coordinator that does not say: ask
                    phase = self._request("GET", f"/v1/studies/{study}/status").json()["phase"]
                if phase == "done" and study:
                    return done
                continue
            finished = self.run_task(TaskResponse.model_validate(response.json()))
            done += 1
            if not finished and self.region is not None and done != max_tasks:
                time.sleep(self.region.settings.poll_s)
        return done

    def _study_id(self) -> str | None:
        path = self.state_dir / "study"
        return path.read_text().strip() if path.exists() else None

    def run_task(self, task: TaskResponse) -> bool:
        """Run `task` and upload its result (or refuse it); False while a region's node
        waits for its regional round."""
        study, number, kind = task.study, task.round, task.kind
        (self.state_dir / "study").write_text(study)
        if task.secure is not None:
            return self._secure_step(task)
        cache = self.state_dir / "outbox" / f"{study}-round{number}.bin"
        if cache.exists():
            payload = cache.read_bytes()  # computed before a restart: send the same bytes
        else:
            try:
                if self.region is not None:
                    self.policy.admit(task)  # the region's sites check their own ranges
                    relayed = self.region.payload(task, self._national, self._manifest(task))
                    if relayed is None:
                        return False
                    payload = relayed
                else:
                    self.policy.admit(task, own_feature_ranges(
                        self._data, task.feature_names, self._agreed_features(task)))
                    payload = self._compute(task)
            except (TaskRefused, PrivacyBudgetExceeded) as exc:
                self._refuse(task, exc)
                return True
            self.policy.record(task)
            if kind == "train" and self.config.train_delay_s:
                time.sleep(self.config.train_delay_s)  # rehearsing a slow site
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, cache)
        url = f"/v1/studies/{study}/rounds/{number}/updates"
        self.outbound.record(kind, payload, url)
        try:
            ack = self._request("POST", url, content=payload)
        except NodeError as exc:
            if exc.code == StaleUpdateRefused.code:
                # Asynchronous study: the model moved on too far while this site trained.
                log.warning("round %d: update refused as stale; training on the newest "
                            "model next", number)
                return True
            if exc.code == RoundClosed.code:  # e.g. a slow region past the deadline
                log.warning("round %d closed before this result arrived; on with the "
                            "study's next task", number)
                return True
            raise
        log.info("round %d (%s): %s, %d bytes", number, kind, ack.json()["status"], len(payload))
        return True

    def _refuse(self, task: TaskResponse, exc: Exception) -> None:
        log.warning("round %d (%s) refused: %s", task.round, task.kind, exc)
        self._request("POST", f"/v1/studies/{task.study}/rounds/{task.round}/refusal",
                      json={"reason": str(exc)[:500]})

    def _secure_step(self, task: TaskResponse) -> bool:
        """Post this site's message for the step of the round's secure sum
        (:mod:`cardiofed.node.secure_rounds`), or refuse the round."""
        assert task.secure is not None
        step = task.secure.step
        try:
            body = self._secure_message(task)
        except (TaskRefused, PrivacyBudgetExceeded) as exc:
            self._refuse(task, exc)
            return True
        url = f"/v1/studies/{task.study}/rounds/{task.round}/secure/{step}"
        self.outbound.record(f"{task.kind} ({step})", body.model_dump_json().encode(), url)
        try:
            self._request("POST", url, params={"attempt": task.secure.attempt},
                          json=body.model_dump(mode="json"))
        except NodeError as exc:
            if exc.status_code != 409:
                raise
            log.warning("round %d: the secure sum moved on: %s", task.round, exc)
        else:
            log.info("round %d (%s): secure sum, %s sent", task.round, task.kind, step)
        return True

    def _secure_message(self, task: TaskResponse) -> BaseModel:
        assert task.secure is not None
        plan = SimulationConfig.model_validate(task.plan)
        step, name = task.secure.step, self._site_name()
        if step == "share":
            return self.secure.share(task, name, plan)
        if step == "confirm":
            return self.secure.confirm(task)
        if step == "reveal":
            return self.secure.reveal(task)
        if self.ledger is None:
            raise TaskRefused("The study's rounds are secure sums with distributed noise, "
                              "which each site adds from its privacy budget; this node has "
                              "none (privacy = \"off\").")
        if plan.attribution is not None:
            return self._secure_attribution(task, plan.attribution, name)
        catalogue = self._agreed_features(task)
        ranges = own_feature_ranges(self._data, task.feature_names, catalogue)
        self.policy.admit(task, ranges)
        site = self._site_data(task, plan, catalogue)
        privacy = self._site_privacy(plan, site, task.study)
        assert privacy is not None
        _check_private(task, plan, privacy)
        kind = task.kind

        def charge_once(multiplier: float) -> None:  # the statistics' or evaluation's sum
            privacy.charge_secure_sum(kind, multiplier)

        if kind == "statistics":
            edges = bin_edges(ranges, PRIVATE_BINS)
            if step == "advertise":
                return self.secure.advertise(task, name, privacy.secure_sum_noise(kind),
                                             vector_length(kind, len(ranges), 0))
            message = self.secure.input(task, charge_once,
                                        lambda: statistics_vector(site.x_train, edges))
        elif kind == "evaluate":
            if not self.config.publish_metrics:
                raise TaskRefused("This site publishes no evaluation (publish_metrics = "
                                  "false), not even as part of a secure sum.")
            pre, weights = self._model(task, plan, site, ranges)
            if step == "advertise":
                return self.secure.advertise(task, name, privacy.secure_sum_noise(kind),
                                             vector_length(kind, 0, 0))
            message = self.secure.input(task, charge_once, lambda: evaluation_vector(
                site.y_test, risks_on_test_split(site, pre, plan, weights, ranges)))
        else:
            pre, weights = self._model(task, plan, site, ranges)
            if step == "advertise":
                return self.secure.advertise(task, name, privacy.secure_training_noise(),
                                             vector_length("train", len(ranges), sum(
                                                 v.size for v in weights.values())))
            message = self.secure.input(
                task, lambda m: privacy.charge_secure_round(m, f"round {task.round}"),
                lambda: gradient_vector(weights, bounded_rows(pre, site.x_train, ranges),
                                        site.y_train, plan.dp_max_grad_norm))
        self.policy.record(task)
        return message

    @property
    def _data(self) -> DataSource:
        if self.config.data is None:
            raise NodeError("This node relays a region ([region]) and holds no data.")
        return self.config.data

    def _national(self, url: str) -> bytes:
        return self._request("GET", url).content

    def _agreed_features(self, task: TaskResponse) -> Catalogue:
        """The catalogue of the study's plan, refused unless its declared features are
        exactly those of the feature file in the node's own config."""
        try:
            declared = SimulationConfig.model_validate(task.plan).study_features
        except ValueError as exc:
            raise TaskRefused(f"The task's plan is not a valid plan: {exc}") from None
        path = self._data.features
        own = None if path is None else StudyFeatures.from_toml(path)
        if declared != own:
            raise TaskRefused(
                "The study declares its own features, and this node's config names no "
                "feature file (data.features)" if own is None else
                f"The study's declared features differ from those in {path}, which this "
                f"site agreed to" if declared is not None else
                f"This node's config names the feature file {path}, but the study declares "
                f"no features of its own")
        return catalogue_of(own)

    def _compute(self, task: TaskResponse) -> bytes:
        plan = SimulationConfig.model_validate(task.plan)
        check_exact_releases(plan, private=self.ledger is not None, opt_in=self.config.opt_in)
        if plan.attribution is not None:
            return self._attribution(task, plan.attribution)
        if plan.survival is not None:
            return self._survival(task, plan.survival)
        catalogue = self._agreed_features(task)
        site, study = self._site_data(task, plan, catalogue), task.study
        manifest = self._manifest(task)
        ranges = own_feature_ranges(self._data, task.feature_names, catalogue)
        privacy = self._site_privacy(plan, site, study)
        if privacy is not None:
            _check_private(task, plan, privacy)
            if task.kind == "train" and privacy.released_n() is None:
                raise TaskRefused("This site trains privately only after the study's "
                                  "statistics release: its noisy record count plans DP-SGD "
                                  "(the exact count never leaves the site).")
        if task.kind == "statistics":
            return statistics_payload(site, ranges, manifest, privacy)
        pre, weights = self._model(task, plan, site, ranges)
        if task.kind == "evaluate":
            return evaluate_payload(site, pre, plan, weights, privacy, ranges=ranges,
                                    publish=self.config.publish_metrics)
        if task.kind == "intercept":
            return intercept_payload(site, pre, plan, weights, privacy,
                                     manifest=manifest, ranges=ranges)
        return train_payload(site, pre, plan, weights, round_number=task.round,
                             site_index=task.site_index, manifest=manifest, privacy=privacy,
                             ranges=ranges)

    def _site_data(self, task: TaskResponse, plan: SimulationConfig,
                   catalogue: Catalogue) -> SiteData:
        """The site's rows in the study's columns, loaded at its first task."""
        if self._site is None:
            self._site = load_site_data(self._data, task.feature_names, catalogue)
            # Kept for `cardiofed node audit --scan-rows`.
            (self.state_dir / "feature_names.json").write_text(json.dumps(task.feature_names))
            if plan.study_features is not None:
                (self.state_dir / "study_features.json").write_text(
                    plan.study_features.model_dump_json())
        return self._site

    def _model(self, task: TaskResponse, plan: SimulationConfig, site: SiteData,
               ranges: list[tuple[float, float]]) -> tuple[Preprocessor, Weights]:
        """The study's preprocessor and the task's model, through the release gate."""
        if self._pre is None:
            blob = self._request("GET", f"/v1/studies/{task.study}/preprocessor").content
            self._pre = site_preprocessor(blob, site, plan, task.feature_names, ranges)
        version = (task.study, task.model_version)  # a version's weights never change
        if self._weights is None or self._weights[0] != version:
            self._weights = version, study_weights(plan, self._pre, self._request(
                "GET", f"/v1/studies/{task.study}/models/{task.model_version}").content)
        return self._pre, self._weights[1]

    def _manifest(self, task: TaskResponse) -> dict[str, str]:
        manifest = {"study": task.study, "round": str(task.round),
                    "model_version": str(task.model_version), "site": self._site_name()}
        if self.region is None:  # a site says whether its releases carry its own noise
            manifest["privacy"] = "off" if self.ledger is None else "dp"
        return manifest

    def _attribution_rows(self, task: TaskResponse, plan: AttributionPlan
                          ) -> tuple[SiteArrays, list[tuple[float, float]]]:
        """The site's rows for the analysis (loaded at its first step) and its own
        clipping ranges."""
        catalogue = self._agreed_features(task)
        if self._rows is None:
            self._rows = attribution_site(self._data, plan, task.feature_names,
                                          task.outcome, catalogue)
        return self._rows, own_feature_ranges(self._data, task.feature_names, catalogue)

    def _secure_attribution(self, task: TaskResponse, plan: AttributionPlan,
                            name: str) -> BaseModel:
        """This site's message for an attribution step over a secure sum: its noise need
        (advertise), or its exact sums scaled to sensitivity 1 and masked with its noise
        share (input), charged first."""
        state = _step_state(task, "an attribution")
        rows, ranges = self._attribution_rows(task, plan)
        try:
            check_state(plan, state, ranges)
        except (KeyError, TypeError, ValueError, CardioFedError) as exc:
            raise TaskRefused(f"The {task.kind} task's state is not one this site can "
                              f"compute with: {type(exc).__name__}: {exc}") from None
        privacy = self._study_privacy(task.study, len(rows.outcome))
        assert task.secure is not None
        if task.secure.step == "advertise":
            return self.secure.advertise(task, name, privacy.attribution_noise(plan),
                                         attribution_length(plan, state))
        return self.secure.input(
            task, lambda m: privacy.charge_secure_attribution(
                m, plan, f"attribution {task.kind} (round {task.round}, secure sum)"),
            lambda: attribution_vector(plan, state,
                                       site_step(plan, state, rows, task.site_index, ranges)))

    def _attribution(self, task: TaskResponse, plan: AttributionPlan) -> bytes:
        """An attribution step's sums over the site's rows. A site with a privacy budget
        takes part only in a private plan, and releases each step through its ledger
        (charged before the sums are computed); a non-private site releases exact sums,
        and only if its config opts in. The clipping ranges are the site's own; the step's
        state passes the release gate (:func:`cardiofed.causal.study.check_state`)."""
        if self.ledger is not None and not plan.private:
            raise TaskRefused("This site has a privacy budget, and the attribution plan is "
                              "not private: its sums would be exact. A private plan "
                              "(attribution.private = true) lets this site take part.")
        state = _step_state(task, "an attribution")
        rows, ranges = self._attribution_rows(task, plan)

        def compute() -> dict[str, np.ndarray]:
            return site_step(plan, state, rows, task.site_index, ranges)

        try:
            check_state(plan, state, ranges)
            # Exact sums (the site's choice) are computed here; a private site's only
            # once they are charged, and whatever fails then releases noise alone.
            exact = compute() if self.ledger is None else None
        except (KeyError, TypeError, ValueError, CardioFedError) as exc:
            raise TaskRefused(f"The {task.kind} task's state is not one this site can "
                              f"compute with: {type(exc).__name__}: {exc}") from None
        if exact is not None:
            arrays = release(plan, state, exact, 0.0, None) if plan.private else exact
        else:
            arrays = self._study_privacy(task.study, len(rows.outcome)).release_attribution(
                plan, state, compute, f"attribution {task.kind} (round {task.round})")
        return encode_arrays(arrays, self._manifest(task))

    def _survival(self, task: TaskResponse, plan: SurvivalPlan) -> bytes:
        """A survival round's Cox sums (or, stratified, the site's own derivatives, then its
        baseline's sums at the fit; with evaluate, its figures of the model it is served
        on its held-out rows) over its rows clipped to its own ranges, at the
        coefficients in the task's state once they pass
        :func:`cardiofed.survival.study.check_state`. Exact only: a site with a
        privacy budget refuses (no private release of Cox sums exists yet)."""
        if self.ledger is not None:
            raise TaskRefused("This site has a privacy budget, and Cox sums have no private "
                              "release yet: only a non-private site (privacy = \"off\", "
                              "opt_in = [\"exact_survival\"]) takes part in a survival "
                              "study.")
        state = _step_state(task, "a survival")
        catalogue = self._agreed_features(task)
        # With evaluate, the fit uses the training rows and the evaluation the held-out.
        part: Literal["all", "train", "test"] = (
            "all" if not plan.evaluate else "test" if task.kind == "assess" else "train")
        if part not in self._survival_rows:
            self._survival_rows[part] = survival_rows(self._data, task.feature_names,
                                                      task.outcome, catalogue, part=part)
        time, event, x = self._survival_rows[part]
        ranges = own_feature_ranges(self._data, task.feature_names, catalogue)
        try:
            arrays = survival_step(plan, state, time, event, x, ranges, self._site_name())
        except (KeyError, TypeError, ValueError, CardioFedError) as exc:
            raise TaskRefused(f"The {task.kind} task's state is not one this site can "
                              f"compute with: {type(exc).__name__}: {exc}") from None
        return encode_arrays(arrays, self._manifest(task))

    def _study_privacy(self, study: str, n_records: int,
                       plan: SimulationConfig | None = None) -> SitePrivacy:
        """The site's DP wrapper for `study` over the hospital's one ledger."""
        assert self.ledger is not None and self.config.private is not None
        if self._privacy is None or self._privacy.study != study:
            self.ledger.site = self._site_name()  # for messages only
            self.ledger.check_records(n_records)
            self._privacy = SitePrivacy(
                ledger=self.ledger, local=None if plan is None else plan.local_config(),
                rounds=1 if plan is None else plan.rounds,
                max_grad_norm=self.config.private.max_grad_norm, study=study,
                intercept_step=plan is not None and plan.intercept_step_for(True))
        return self._privacy

    def _site_name(self) -> str:
        if self._name is None:
            self._name = str(self._request("GET", "/v1/me").json()["site"])
        return self._name

    def _site_privacy(self, plan: SimulationConfig, site: SiteData,
                      study: str) -> SitePrivacy | None:
        """The site's DP wrapper for `study` (None for a non-private site)."""
        if self.ledger is None:
            return None
        return self._study_privacy(study, site.n_train + len(site.y_test), plan)


def _check_private(task: TaskResponse, plan: SimulationConfig, privacy: SitePrivacy) -> None:
    """Refuse what a private site's ledger or the plan's standardisation rules out."""
    allowed = planned_releases(task.kind, plan.rounds)
    if len(privacy.ledger.releases(task.kind, task.study)) >= allowed:
        raise TaskRefused(f"The privacy ledger already holds {allowed} {task.kind} "
                          f"release(s) of study {task.study!r}, all the plan allows.")
    if plan.standardisation == "per-site":
        raise TaskRefused("standardisation 'per-site' uses the site's exact mean and "
                          "SD, which its privacy budget does not cover.")


def _step_state(task: TaskResponse, study_kind: str) -> dict[str, Any]:
    """The analysis state an attribution or survival task carries for its own step."""
    state = task.attribution
    if state is None or state.get("step") != task.kind:
        raise TaskRefused(f"The {task.kind} task of {study_kind} study carries no state "
                          f"for that step.")
    return state
