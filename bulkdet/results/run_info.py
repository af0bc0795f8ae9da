"""What `export`, `crops` and `eval` need of a run besides its rows: its class names, the user's class choice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bulkdet.model.info import UnknownClass, class_ids
from bulkdet.store.parts import read_run_json


class UsageError(ValueError):
    """The user asked for something the run cannot give (e.g. a class it does not have)."""


@dataclass
class RunInfo:
    """What the readers of a run need from run.json."""
    run_dir: Path
    run: dict  # run.json as stored
    names: dict[int, str]  # class id -> name, from the model (or --names) the run used

    @property
    def config(self) -> dict:
        return self.run.get("config", {})

    def dataset(self, given: Path | None = None) -> Path:
        """The dataset the run read: `given` (it moved), else the one run.json names."""
        return Path(given or self.run.get("dataset") or self.config.get("dataset", ""))

    @classmethod
    def load(cls, run_dir: Path) -> "RunInfo":
        run = read_run_json(run_dir)
        names = {int(k): str(v) for k, v in (run.get("model", {}).get("names") or {}).items()}
        return cls(Path(run_dir), run, names)

    def class_ids(self, classes: list[str] | None) -> list[int] | None:
        """Class ids for names or ids given by the user (None: all). Unknown ones raise UsageError."""
        try:
            return class_ids(classes, self.names, "the run's")
        except UnknownClass as exc:
            raise UsageError(str(exc)) from None
