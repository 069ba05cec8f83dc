"""The typed configuration of a whole run (`probekd run CONFIG.yaml`): every field documented where it is declared.

A YAML file holds any subset of the fields; the rest take their defaults. `--set section.field=value` on the
command line overrides a field. Unknown fields and bad values are errors that name the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from probekd.errors import ConfigError
from probekd.layout import Cell
from probekd.probes.pipeline import ProbeConfig
from probekd.selection import Selection
from probekd.student.heads import StudentConfig, recorded_student
from probekd.student.train_config import TrainConfig, check_loss, check_loss_options
from probekd.targets import SIGNALS
from probekd.teacher.pipeline import ExtractConfig
from probekd.tuning import TUNED_FIELDS, TuneConfig
from probekd.weighting import Scheme

SPLITS = ("train", "dev", "test")


class CellPattern(BaseModel):
    """Grid cells to leave out: the axes it names must all match (an axis it leaves out matches anything)."""

    model_config = ConfigDict(extra="forbid")

    signal: str | None = None
    fraction: float | None = None
    seed: int | None = None
    loss: str | None = None
    weighting: Scheme | None = None
    selection: Selection | None = None

    @field_validator("signal")
    @classmethod
    def _signal(cls, v: str | None) -> str | None:
        if v is not None and v not in SIGNALS:
            raise ValueError(f"unknown signal {v!r}; known: {list(SIGNALS)}")
        return v

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str | None) -> str | None:
        return None if v is None else check_loss(v)

    @model_validator(mode="after")
    def _names_an_axis(self) -> CellPattern:
        if not self.model_dump(exclude_none=True):
            raise ValueError(
                "an exclude entry names at least one of signal, fraction, seed, loss, weighting, selection"
            )
        return self

    def matches(self, cell: Cell) -> bool:
        """Whether `cell` is one this pattern names."""
        return all(getattr(cell, k) == v for k, v in self.model_dump(exclude_none=True).items())


class GridConfig(BaseModel):
    """The experiment grid: labelled fractions x seeds x signals, one student per cell."""

    model_config = ConfigDict(extra="forbid")

    fractions: list[float] = Field([1.0], min_length=1, description="Labelled shares of the training split (nested).")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Seeds: labelled subset, head init, data order.")
    signals: list[str] = Field(list(SIGNALS), min_length=1, description=f"Targets to compare: {', '.join(SIGNALS)}.")
    mode: Literal["supervised", "semi"] = Field(
        "supervised",
        description="`supervised`: students train on the labelled rows only; `semi`: also on the rest of the "
        "training split as an unlabelled pool, with the probe's or teacher's targets and no gold label.",
    )
    teacher_temperature: float = Field(1.0, gt=0, description="Temperature of the `teacher` signal's softmax.")
    smoothing: float | Literal["match_probe"] = Field(
        "match_probe",
        description="The `smoothed` signal's weight eps in (1 - eps) one-hot + eps uniform: a number in [0, 1], or "
        "`match_probe` (the default): per cell, the weight whose targets are as soft as that cell's probe targets "
        "(equal mean normalized entropy on the labelled training rows), so the two differ only in what the probe "
        "knows.",
    )
    dev: Literal["full", "proportional"] = Field(
        "full",
        description="Dev labels a cell may use to choose its probe layer, temperatures, calibration and student "
        "epoch: `full` (the whole dev split, every cell) or `proportional` (the cell's labelled fraction of dev, "
        "nested and seeded like the training subset, at least `min_dev` questions): the honest label budget of a "
        "low-data cell. The shipped experiment configs use `proportional`; `full` is the default for run folders "
        "made before the field existed.",
    )
    min_dev: int = Field(20, ge=1, description="Under `dev: proportional`, the fewest dev questions a cell uses.")
    losses: list[str] | None = Field(
        None, description="Loss axis (values of train.loss, e.g. [fkl, akl, 'fkl>rkl']); default: train.loss alone."
    )
    weightings: list[Scheme] | None = Field(
        None,
        description="Weighting axis (none, paced, hard_filter, influence, ddk); default: train.weighting.scheme alone.",
    )
    selections: list[Selection] | None = Field(
        None,
        description="Which training questions are labelled at each fraction (`probekd.selection`): `random` (the "
        "seed's order) and/or `pcoreset` (coverage of the teacher's answer distributions); default: [random].",
    )

    keep_students: Literal["all", "best", "none"] = Field(
        "all",
        description="Which trained students are kept as Hugging Face folders (RUN/students/<cell>/model/): `all`; "
        "`best`, per signal, fraction, loss and weighting the seed with the best dev accuracy (for large sweeps); "
        "`none` (metrics and test predictions only).",
    )
    exclude: list[CellPattern] = Field(
        [],
        description="Cells of the product to leave out, e.g. [{loss: akl, weighting: paced}] (AKL as an unweighted "
        "comparator only); an entry names some axes, a cell matching all of them is not trained.",
    )

    @field_serializer("exclude")
    def _dump_exclude(self, v: list[CellPattern]) -> list[dict[str, Any]]:
        return [p.model_dump(exclude_none=True) for p in v]

    @field_validator("losses")
    @classmethod
    def _losses(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else list(dict.fromkeys(check_loss(x) for x in v))

    @field_validator("smoothing")
    @classmethod
    def _smoothing(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 <= v <= 1:
            raise ValueError(f"a smoothing weight must be in [0, 1] (or `match_probe`), got {v}")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError(f"fractions must be in (0, 1], got {v}")
        return sorted(set(v))

    @field_validator("signals")
    @classmethod
    def _signals(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SIGNALS]
        if bad:
            raise ValueError(f"unknown signal(s) {bad}; known: {list(SIGNALS)}")
        return list(dict.fromkeys(v))


class RunConfig(BaseModel):
    """One run: a task, a teacher, its probes, and a grid of students."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("run", description="A name for the run (used in the report's title).")
    task: str = Field("arc_easy", description="Built-in task name, a folder of train/dev/test files, or hf:<id>.")
    teacher: str = Field("smollm2-135m-instruct", description="Packaged model, local folder, .gguf file or HF id.")
    limit: dict[str, int] = Field(
        {}, description="First N examples of a split, e.g. {train: 200, dev: 100}; absent splits are whole."
    )
    extract: ExtractConfig = Field(default_factory=ExtractConfig)  # type: ignore[arg-type]
    probe: ProbeConfig = Field(default_factory=ProbeConfig)  # type: ignore[arg-type]
    student: StudentConfig = Field(default_factory=StudentConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    grid: GridConfig = Field(default_factory=GridConfig)  # type: ignore[arg-type]
    train_by_signal: dict[str, dict[str, float]] = Field(
        {},
        description="Per signal, `train` fields that differ from `train` for that signal's students, e.g. "
        "{probe: {learning_rate: 1e-4, epochs: 4}}; written by `probekd tune` (the recipe chosen on dev). "
        f"Fields: {', '.join(TUNED_FIELDS)}.",
    )
    tune: TuneConfig = Field(default_factory=TuneConfig)  # type: ignore[arg-type]

    @field_validator("train_by_signal")
    @classmethod
    def _train_by_signal(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for signal, fields in v.items():
            if signal not in SIGNALS:
                raise ValueError(f"unknown signal {signal!r}; known: {list(SIGNALS)}")
            bad = [k for k in fields if k not in TUNED_FIELDS]
            if bad:
                raise ValueError(f"{signal}: fields {bad} cannot be set per signal; these can: {list(TUNED_FIELDS)}")
        return v

    def train_for(self, signal: str) -> TrainConfig:
        """The training settings of `signal`'s students: `train` with that signal's `train_by_signal` entry."""
        fields = self.train_by_signal.get(signal)
        if not fields:
            return self.train
        return TrainConfig.model_validate(self.train.model_dump() | fields)

    @model_validator(mode="after")
    def _recipes_are_valid(self) -> RunConfig:
        for signal in self.train_by_signal:
            try:
                self.train_for(signal)
            except ValidationError as e:
                raise ValueError(f"train_by_signal.{signal}: {_describe(e, 'the tuned recipe')}") from None
        return self

    @model_validator(mode="after")
    def _loss_options_fit_every_loss(self) -> RunConfig:
        for loss in self.grid.losses or []:
            try:
                check_loss_options(loss, self.train.loss_options)
            except ValueError as e:
                raise ValueError(f"grid.losses: {e}") from None
        return self

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k in v if k not in SPLITS]
        if bad or any(n < 1 for n in v.values()):
            raise ValueError(f"limit takes splits {list(SPLITS)} with positive counts, got {v}")
        return v

    def cells(self) -> list[Cell]:
        """Every grid cell: the product of the grid's axes less `grid.exclude`."""
        g = self.grid
        cells = [
            Cell(s, f, seed, loss, w, sel)
            for f in g.fractions
            for seed in g.seeds
            for sel in (g.selections or ["random"])
            for s in g.signals
            for loss in (g.losses or [self.train.loss])
            for w in (g.weightings or [self.train.weighting.scheme])
        ]
        return [c for c in cells if not any(p.matches(c) for p in g.exclude)]


def _set(tree: dict[str, Any], dotted: str) -> None:
    key, sep, raw = dotted.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set wants section.field=value, got {dotted!r}")
    *path, leaf = key.strip().split(".")
    node = tree
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _describe(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return f"bad configuration in {source}: " + "; ".join(parts)


def read_config_tree(
    path: Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """A configuration's mapping from YAML (or `base`) with `--set` overrides applied, and where it came from."""
    tree: dict[str, Any] = dict(base or {})
    source = "the defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of fields, not {type(loaded).__name__}")
        tree.update(loaded or {})
    for item in overrides or []:
        _set(tree, item)
    return tree, source


def is_generative(tree: dict[str, Any]) -> bool:
    """Whether a configuration tree (the YAML's mapping) describes a generative run: it has a `generate:` section
    (`probekd.generative.pipeline.GenerativeRunConfig`)."""
    return "generate" in tree


def validated(model: type[BaseModel], tree: dict[str, Any], source: str) -> Any:
    """`model` validated from `tree`; errors name every bad field (ConfigError)."""
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def load_config(path: Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> RunConfig:
    """Read a run configuration from YAML (or start from `base`), apply `--set` overrides, validate."""
    tree, source = read_config_tree(path, overrides, base)
    if is_generative(tree):
        raise ConfigError(f"{source} is a generative configuration (it has a `generate:` section): run it with "
                          "`probekd run`, or load it with probekd.generative.pipeline.GenerativeRunConfig")  # fmt: skip
    return validated(RunConfig, tree, source)


def recorded_config(path: Path) -> dict[str, Any]:
    """A run folder's RUN/config.yaml as a mapping (not validated), with the defaults of the day it was written
    where a field has changed its default since (`recorded_student`): a run made before a field existed is
    compared and resumed as what it was."""
    tree = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(tree, dict) and isinstance(tree.get("student"), dict):
        tree["student"] = recorded_student(tree["student"])
    return tree


def dump_config(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
