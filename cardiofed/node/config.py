"""A hospital node's configuration: one TOML file.

Example::

    coordinator_url = "https://coordinator.example.org:8443"
    state_dir = "/var/lib/cardiofed"        # credential, ledger, payload cache, outbound log
    enrolment_token = "..."                 # used once, then the credential file is used
    ca_file = "/etc/cardiofed/ca.pem"       # optional: CA of the coordinator's certificate

    [data]
    csv = "/data/export.csv"
    mapping = "/data/mapping.toml"

    [privacy]                               # optional: these are the defaults
    epsilon_max = 3.0                       # what the hospital ever releases, all studies
    study_epsilon = 1.0                     # the most one study may add
    ledger_dir = "/var/lib/cardiofed-privacy"   # default: <state_dir>-privacy
    seal_file = "/etc/cardiofed/ledger.seal"    # default: <ledger_dir>.seal
    delta = 1e-5                            # fixed when the ledger is created
    max_grad_norm = 2.0                     # DP-SGD's bound (the intercept's: 1)
    shares = { statistics = 0.1, train = 0.8, evaluate = 0.1 }   # of each study's epsilon

A node is private unless its config says ``privacy = "off"``: then what it releases is
exact, and it still refuses plans whose batches are smaller than
:data:`~cardiofed.node.task_policy.MIN_EXACT_BATCH` and exact attribution or Cox sums
unless ``opt_in`` names them
(``opt_in = ["small_batches", "exact_attribution", "exact_survival"]``). All the
hospital's nodes should name one ``ledger_dir``: it is the hospital's one privacy ledger
(:mod:`cardiofed.privacy.ledger_file`).

A region of a hierarchical federation (:mod:`cardiofed.protocol.relay`) is a node
of the national study with a ``[region]`` table instead of ``[data]``: it holds no
patient data and relays each national task to its regional coordinator's relay study::

    coordinator_url = "https://national.example.org:8443"
    state_dir = "/var/lib/cardiofed-region"
    enrolment_token = "..."                 # the region's, in the national study

    [region]
    coordinator_url = "https://region-east.example.org:8443"
    study = "heart-east"                    # created there with relay = true
    admin_key_file = "/etc/cardiofed/region-admin.key"
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cardiofed._pydantic import read_toml, validation_problems
from cardiofed.exceptions import ConfigurationError
from cardiofed.node.task_policy import OptIn
from cardiofed.privacy.budget import DEFAULT_SHARES, SiteBudget
from cardiofed.privacy.ledger_file import default_seal_file


class DataSource(BaseModel):
    """Either a CSV export with its mapping file, or a named reference data set's site."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    csv: Path | None = None
    mapping: Path | None = None
    # The study's own feature file the site agreed to: a plan that declares features must
    # declare exactly these (the coordinator cannot redefine them).
    features: Path | None = None
    dataset: str | None = None
    site: str | None = None
    data_dir: Path | None = None
    test_fraction: float = Field(default=0.3, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.csv is None) != (self.mapping is None):
            raise ValueError("data.csv and data.mapping go together")
        if (self.csv is None) == (self.dataset is None):
            raise ValueError("give either data.csv with data.mapping, or data.dataset with "
                             "data.site")
        if self.dataset is not None and self.site is None:
            raise ValueError("data.dataset needs data.site")
        return self


DEFAULT_EPSILON_MAX = 3.0
DEFAULT_STUDY_EPSILON = 1.0


class NodePrivacy(BaseModel):
    """The hospital's own privacy budget; nothing the coordinator sends changes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epsilon_max: float = Field(default=DEFAULT_EPSILON_MAX, gt=0, allow_inf_nan=False)
    study_epsilon: float | None = Field(default=DEFAULT_STUDY_EPSILON, gt=0,
                                        allow_inf_nan=False)
    # The hospital's one ledger (default <state_dir>-privacy, outside state_dir, so that
    # clearing the node's state never resets what the hospital has spent) and its seal.
    ledger_dir: Path | None = None
    seal_file: Path | None = None
    delta: float | None = Field(default=None, gt=0, lt=1)
    max_grad_norm: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    accountant: Literal["rdp", "prv"] = "rdp"
    shares: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SHARES))

    @model_validator(mode="after")
    def _valid_budget(self) -> NodePrivacy:
        self.budget()  # raises, naming the parameter, at load time
        return self

    def budget(self) -> SiteBudget:
        return SiteBudget(epsilon_max=self.epsilon_max, delta=self.delta,
                          accountant=self.accountant, shares=self.shares,
                          study_epsilon=self.study_epsilon)


class RegionSettings(BaseModel):
    """The regional coordinator a region's node drives, with its admin credential."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    coordinator_url: str = Field(pattern=r"^https?://")
    study: str = Field(min_length=1, max_length=64)
    admin_key_file: Path
    ca_file: Path | None = None
    # Seconds between looks at the regional round while its sites train.
    poll_s: float = Field(default=2.0, gt=0, le=600, allow_inf_nan=False)


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    coordinator_url: str = Field(pattern=r"^https?://")
    state_dir: Path
    data: DataSource | None = None
    region: RegionSettings | None = None
    enrolment_token: str | None = None
    ca_file: Path | None = None
    poll_wait_s: float = Field(default=10.0, ge=0)
    # DP for everything the site releases (the defaults of NodePrivacy when left out);
    # `privacy = "off"` in the file sets privacy_off: exact releases.
    privacy: NodePrivacy | None = None
    privacy_off: bool = False
    # Exact releases a non-private site accepts although they expose single records.
    opt_in: list[OptIn] = Field(default_factory=list)
    # Whether the site's evaluation of the final model goes into the model card.
    publish_metrics: bool = True
    # The federation's roster (site name -> Ed25519 public key, agreed out of band): with
    # it the node signs its secure sums' advertisements and shares keys only when every
    # advertisement is a roster site's, signed (cardiofed.secure.identity).
    roster: Path | None = None
    # Seconds to wait after each training task before uploading: rehearses a slow site
    # (benchmarks, demos of asynchronous studies). 0 in production.
    train_delay_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # The longest wait between retries while the coordinator is unreachable (the wait
    # doubles from 0.5 s up to this).
    retry_max_delay_s: float = Field(default=10.0, gt=0, le=600, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _privacy_off(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("privacy"), str):
            if data["privacy"] != "off":
                raise ValueError(f"privacy must be a [privacy] table or \"off\"; got "
                                 f"{data['privacy']!r}")
            data = {**data, "privacy": None, "privacy_off": True}
        return data

    @model_validator(mode="after")
    def _one_role(self) -> NodeConfig:
        if (self.data is None) == (self.region is None):
            raise ValueError("give either [data] (a site with its records) or [region] (a "
                             "region relaying its sites), not both or neither")
        if self.privacy_off and self.privacy is not None:
            raise ValueError("privacy_off and a [privacy] table contradict each other")
        if self.region is not None and self.privacy is not None:
            raise ValueError("a region releases nothing of its own (its sites' releases "
                             "carry their noise): [privacy] belongs in each site's node "
                             "config, not the region's")
        if self.opt_in and self.private is not None:
            raise ValueError("opt_in applies to a non-private site (privacy = \"off\"); a "
                             "private site's releases carry noise whatever the plan")
        if self.private is not None:
            ledger_dir, seal = self.ledger_location()
            for path, what in ((ledger_dir, "privacy.ledger_dir"), (seal, "privacy.seal_file")):
                if path.resolve().is_relative_to(self.state_dir.resolve()):
                    raise ValueError(f"{what} ({path}) must lie outside state_dir "
                                     f"({self.state_dir}): clearing the node's state must "
                                     f"not reset what the hospital has spent")
            if seal.resolve().is_relative_to(ledger_dir.resolve()):
                raise ValueError(f"privacy.seal_file ({seal}) must lie outside "
                                 f"privacy.ledger_dir ({ledger_dir})")
        return self

    @property
    def private(self) -> NodePrivacy | None:
        """The site's privacy settings; None for a non-private site or a region."""
        if self.region is not None or self.privacy_off:
            return None
        return self.privacy or NodePrivacy()

    def ledger_location(self) -> tuple[Path, Path]:
        """The hospital's ledger folder and its seal (defaults filled in)."""
        settings = self.private or NodePrivacy()
        ledger_dir = settings.ledger_dir or self.state_dir.with_name(
            self.state_dir.name + "-privacy")
        return ledger_dir, settings.seal_file or default_seal_file(ledger_dir)

    @classmethod
    def from_toml(cls, path: str | Path) -> NodeConfig:
        path = Path(path)
        raw = read_toml(path, "Node config", ConfigurationError)
        base = path.parent
        for key in ("csv", "mapping", "features", "data_dir"):
            if key in raw.get("data", {}):
                raw["data"][key] = str(base / raw["data"][key])
        raw["state_dir"] = str(base / raw.get("state_dir", "."))
        for key in ("ca_file", "roster"):
            if key in raw:
                raw[key] = str(base / raw[key])
        for key in ("admin_key_file", "ca_file"):
            if isinstance(raw.get("region"), dict) and key in raw["region"]:
                raw["region"][key] = str(base / raw["region"][key])
        for key in ("ledger_dir", "seal_file"):
            if isinstance(raw.get("privacy"), dict) and key in raw["privacy"]:
                raw["privacy"][key] = str(base / raw["privacy"][key])
        return cls.create(**raw)

    @classmethod
    def create(cls, **values: object) -> NodeConfig:
        privacy = values.get("privacy")
        if isinstance(privacy, dict) and "reset_privacy_ledger" in privacy:
            raise ConfigurationError(
                "Invalid node config: privacy.reset_privacy_ledger is no longer a setting "
                "(left in a config it would reset the ledger at every start). Reset "
                "deliberately, once, with `cardiofed node reset-ledger --config <node.toml> "
                "--reason \"...\"`.")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigurationError(
                f"Invalid node config: {validation_problems(exc, 'config')}.") from None
