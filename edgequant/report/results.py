"""Report: the results of a compare call (results.json), its summaries and its rendering."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgequant._io import atomic_write_text
from edgequant.report.plots import PLOTS
from edgequant.report.render import html, markdown


@dataclass
class Report:
    """What compare() measured; `results` has the keys of DESIGN §1's results file."""

    results: dict[str, Any]
    summaries: dict[str, str] = field(default_factory=dict)

    @property
    def recommendation(self) -> dict[str, Any]:
        return dict(self.results["recommendation"])

    def run(self, name: str) -> dict[str, Any]:
        for r in self.results["runs"]:
            if r["name"] == name:
                return dict(r)
        raise KeyError(f"no run named {name!r}; runs: {[r['name'] for r in self.results['runs']]}")

    def _check(self) -> None:
        """A ValueError naming the keys a results dict lacks (DESIGN §1's results file)."""
        if not isinstance(self.results, dict):
            raise TypeError(f"Report.results must be a dict, got {type(self.results).__name__}")
        missing = [k for k in RESULTS_KEYS if k not in self.results]
        if missing:
            raise ValueError(
                f"Report.results lacks the keys {missing} of a results file; it has "
                f"{sorted(self.results)}"
            )

    def to_markdown(self) -> str:
        self._check()
        return markdown(self.results, self.summaries)

    def plots(self, out_dir: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
        """Draw each plot of report.plots.PLOTS as out_dir/<name>.png: (name -> path, name ->
        error). Plots are isolated like runs: one that fails is reported, the others are drawn."""
        folder = out_folder(out_dir, "out_dir")
        folder.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        errors: dict[str, str] = {}
        for name, plot in PLOTS.items():
            try:
                path = plot(self.results, folder)
                if path is not None:  # None: nothing for this plot to show in these results
                    paths[name] = path
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {err}"
                # A picture left by an earlier save would show other numbers than this report.
                (folder / f"{name}.png").unlink(missing_ok=True)
        return paths, errors

    def save(self, out_dir: str | Path) -> Path:
        """results.json, report.md, plots/*.png and report.html in out_dir, each written
        atomically; returns the folder. The measurements are written first, so a plot that
        fails (named in report.html and warned about) cannot lose them."""
        out = out_folder(out_dir, "out_dir")
        out_folder(out / "plots", "out_dir/plots")
        # Rendered before anything is written: results that cannot be rendered leave an
        # earlier report in out_dir whole, not a new results.json beside an old report.md.
        markdown = self.to_markdown()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(self.results, indent=1))
        atomic_write_text(out / "report.md", markdown)
        paths, errors = self.plots(out / "plots")
        for name, error in errors.items():
            warnings.warn(f"edgequant report: plot {name!r} not drawn: {error}", stacklevel=2)
        atomic_write_text(out / "report.html", html(self.results, self.summaries, paths, errors))
        return out


RESULTS_KEYS = ("task", "metric", "tolerance", "baseline", "runs", "recommendation")


def out_folder(out_dir: str | Path, name: str) -> Path:
    """out_dir as a Path; a ValueError when it names an existing file, not a folder."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(out_dir).__name__}")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name} {str(folder)!r} is a file, not a folder")
    return folder
