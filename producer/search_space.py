"""The search space: defaults in search_space.toml, each dimension overridable from the command line."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.config import TrialConfig

if TYPE_CHECKING:
    import optuna

DEFAULT_FILE = Path(__file__).with_name("search_space.toml")
# Per-trial (seed) and per-study (dataset, split_seed) settings are not searched.
SEARCHABLE = tuple(f.name for f in dataclasses.fields(TrialConfig) if f.name not in ("seed", "dataset", "split_seed"))

Scalar = bool | int | float | str
MINIMUM = {"lr": 0.0, "hidden": 1, "depth": 0, "dropout": 0.0, "weight_decay": 0.0, "batch_size": 1, "epochs": 1}


class SearchSpaceError(ValueError):
    pass


def _scalar(text: str) -> Scalar:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


KINDS = {f.name: f.type for f in dataclasses.fields(TrialConfig)}  # "bool", "int", "float", "str"


def _check_kind(name: str, values: list[Any]) -> None:
    """Every value of dimension `name` is of the kind TrialConfig declares: `--spectral-norm yes` or `--lr abc`
    is refused here, before any training (tests/test_config_errors.py)."""
    kind = KINDS[name]
    fits = {"bool": lambda v: isinstance(v, bool), "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool)}.get(kind, lambda v: True)
    if name in MINIMUM and (low := [v for v in values if fits(v) and v < MINIMUM[name]]):
        raise SearchSpaceError(f"{name}: {low[0]} is below {MINIMUM[name]}")
    if bad := [v for v in values if not fits(v)]:
        expected = "true or false" if kind == "bool" else f"{'an integer' if kind == 'int' else 'a number'}"
        raise SearchSpaceError(f"{name}: {str(bad[0]).lower() if isinstance(bad[0], bool) else bad[0]!s} "
                               f"is not {expected}")


@dataclass(frozen=True)
class Dimension:
    """One of: `choices` (categorical), `low`/`high` (range; int when both bounds are int), `value` (fixed)."""

    name: str
    choices: tuple[Scalar, ...] | None = None
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    value: Scalar | None = None

    @classmethod
    def from_table(cls, name: str, table: dict[str, Any]) -> Dimension:
        if name not in SEARCHABLE:
            raise SearchSpaceError(f"unknown dimension {name!r}; known: {', '.join(SEARCHABLE)}")
        unknown = set(table) - {"choices", "low", "high", "log", "step", "value"}
        kinds = [k for k in ("choices", "value") if k in table] + (["range"] if {"low", "high"} & set(table) else [])
        if unknown or len(kinds) != 1 or (kinds == ["range"] and not {"low", "high"} <= set(table)):
            raise SearchSpaceError(f"{name}: give exactly one of choices = [...], low/high, value (got {table})")
        _check_kind(name, [table[k] for k in ("value", "low", "high") if k in table] + list(table.get("choices", ())))
        if "choices" in table:
            if not table["choices"]:
                raise SearchSpaceError(f"{name}: choices is empty")
            return cls(name, choices=tuple(table["choices"]))
        if "value" in table:
            return cls(name, value=table["value"])
        low, high = table["low"], table["high"]
        if low > high:
            raise SearchSpaceError(f"{name}: low {low} > high {high}")
        return cls(name, low=low, high=high, log=bool(table.get("log", False)), step=table.get("step"))

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def override(self, spec: str) -> Dimension:
        """From a flag: `V` fixes it, `A,B,C` are choices, `LOW:HIGH[:log|:linear]` a range (log scale kept from
        the default unless said; a float range stays float)."""
        if "," in spec:
            return Dimension.from_table(self.name, {"choices": [_scalar(p) for p in spec.split(",") if p.strip()]})
        if ":" in spec:
            low, high, *scale = spec.split(":")
            bounds = [_scalar(low), _scalar(high)]
            if not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds):
                raise SearchSpaceError(f"--{self.name.replace('_', '-')} {spec}: bounds must be numbers")
            if self.low is not None and not self.is_int:
                bounds = [float(b) for b in bounds]
            if scale not in ([], ["log"], ["linear"]):
                raise SearchSpaceError(f"--{self.name.replace('_', '-')} {spec}: scale is log or linear")
            log = scale == ["log"] if scale else self.log
            return Dimension.from_table(self.name, {"low": bounds[0], "high": bounds[1], "log": log})
        return Dimension.from_table(self.name, {"value": _scalar(spec)})

    @property
    def spec(self) -> str:
        """This dimension written as a flag's SPEC."""
        if self.choices is not None:
            return ",".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)
        if self.low is None:
            return str(self.value).lower() if isinstance(self.value, bool) else str(self.value)
        return f"{self.low}:{self.high}" + (":log" if self.log else "")

    @property
    def table(self) -> dict[str, Any]:
        """This dimension as its TOML table."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        if self.low is None:
            return {"value": self.value}
        return {"low": self.low, "high": self.high, "log": self.log} | ({"step": self.step} if self.step else {})

    def suggest(self, trial: optuna.Trial) -> Scalar:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.low is None:
            return self.value
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    dimensions: dict[str, Dimension]

    @classmethod
    def load(cls, path: Path | None = None, overrides: dict[str, str] | None = None) -> SearchSpace:
        path = path or DEFAULT_FILE
        try:
            tables = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SearchSpaceError(f"cannot read the search space {path}: {exc}") from None
        dimensions = {name: Dimension.from_table(name, table) for name, table in tables.items()}
        missing = set(SEARCHABLE) - set(dimensions)
        if missing:
            raise SearchSpaceError(f"{path} lacks {', '.join(sorted(missing))}")
        for name, spec in (overrides or {}).items():
            if spec is not None:
                dimensions[name] = dimensions[name].override(spec)
        return cls(dimensions)

    def to_tables(self) -> dict[str, dict[str, Any]]:
        """The space as TOML-like tables (JSON-able): what a study stores at creation."""
        return {name: d.table for name, d in self.dimensions.items()}

    @classmethod
    def from_tables(cls, tables: dict[str, dict[str, Any]]) -> SearchSpace:
        return cls({name: Dimension.from_table(name, table) for name, table in tables.items()})

    @property
    def searches_the_flag(self) -> bool:
        """Both arms are reachable: what the paired design needs."""
        return set(self.dimensions["spectral_norm"].choices or ()) == {True, False}

    def sample(self, trial: optuna.Trial) -> dict[str, Scalar]:
        return {name: dimension.suggest(trial) for name, dimension in self.dimensions.items()}
