"""A hospital node's configuration: one TOML file.

Example::

    coordinator_url = "https://coordinator.example.org:8443"
    state_dir = "/var/lib/cardiofed"        # credential, ledger, payload cache, outbound log
    enrolment_token = "..."                 # used once, then the credential file is used
    ca_file = "/etc/cardiofed/ca.pem"       # optional: CA of the coordinator's certificate

    [data]
    csv = "/data/export.csv"
    mapping = "/data/mapping.toml"

    [privacy]                               # optional: DP for everything this site releases
    epsilon_max = 1.0
    ledger_dir = "/var/lib/cardiofed-privacy"   # required: keep it outside state_dir
    delta = 1e-5                            # default min(1e-5, 1/(10 n))
    max_grad_norm = 1.0
    shares = { statistics = 0.1, train = 0.8, evaluate = 0.1 }   # of epsilon_max

A region of a hierarchical federation (:mod:`cardiofed.coordinator.relay`) is a node
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
from cardiofed.privacy.budget import DEFAULT_SHARES, SiteBudget


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


class NodePrivacy(BaseModel):
    """The site's own privacy budget; nothing the coordinator sends changes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epsilon_max: float = Field(gt=0, allow_inf_nan=False)
    # Where the site's ledger lives, bound to its records: outside state_dir, so that
    # clearing the node's state never resets what the data has spent.
    ledger_dir: Path
    delta: float | None = Field(default=None, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    accountant: Literal["rdp", "prv"] = "rdp"
    shares: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SHARES))
    # Start a new ledger although one existed for these records and is gone. Logged.
    reset_privacy_ledger: bool = False

    @model_validator(mode="after")
    def _valid_budget(self) -> NodePrivacy:
        SiteBudget(epsilon_max=self.epsilon_max, delta=self.delta, accountant=self.accountant,
                   shares=self.shares)  # raises, naming the parameter, at load time
        return self


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
    privacy: NodePrivacy | None = None
    # Whether the site's evaluation of the final model goes into the model card.
    publish_metrics: bool = True
    # Seconds to wait after each training task before uploading: rehearses a slow site
    # (benchmarks, demos of asynchronous studies). 0 in production.
    train_delay_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # The longest wait between retries while the coordinator is unreachable (the wait
    # doubles from 0.5 s up to this).
    retry_max_delay_s: float = Field(default=10.0, gt=0, le=600, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_role(self) -> NodeConfig:
        if (self.data is None) == (self.region is None):
            raise ValueError("give either [data] (a site with its records) or [region] (a "
                             "region relaying its sites), not both or neither")
        if self.region is not None and self.privacy is not None:
            raise ValueError("a region releases nothing of its own (its sites' releases "
                             "carry their noise): [privacy] belongs in each site's node "
                             "config, not the region's")
        return self

    @classmethod
    def from_toml(cls, path: str | Path) -> NodeConfig:
        path = Path(path)
        raw = read_toml(path, "Node config", ConfigurationError)
        base = path.parent
        for key in ("csv", "mapping", "features", "data_dir"):
            if key in raw.get("data", {}):
                raw["data"][key] = str(base / raw["data"][key])
        raw["state_dir"] = str(base / raw.get("state_dir", "."))
        if "ca_file" in raw:
            raw["ca_file"] = str(base / raw["ca_file"])
        for key in ("admin_key_file", "ca_file"):
            if isinstance(raw.get("region"), dict) and key in raw["region"]:
                raw["region"][key] = str(base / raw["region"][key])
        if isinstance(raw.get("privacy"), dict) and "ledger_dir" in raw["privacy"]:
            raw["privacy"]["ledger_dir"] = str(base / raw["privacy"]["ledger_dir"])
        return cls.create(**raw)

    @classmethod
    def create(cls, **values: object) -> NodeConfig:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigurationError(
                f"Invalid node config: {validation_problems(exc, 'config')}.") from None
