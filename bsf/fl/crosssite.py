"""Cross-site evaluation as a table: every model (global, best global, each site's own) at every site.

NVFlare's ``CrossSiteModelEval`` sends each model to each site for validation and its
``ValidationJsonGenerator`` writes ``cross_site_val/cross_val_results.json``::

    {"<data site>": {"<model>": {"val_dice_mean": 0.71, ...}, ...}, ...}

with models named ``SRV_FL_global_model.pt``, ``SRV_best_FL_global_model.pt`` (the server's) and
``<site>`` (that site's local model at the end of training). :func:`cross_site_table` turns it
into rows = models, columns = the sites whose validation cases were used, one table per metric,
and :func:`write_cross_site_table` writes ``cross_site_table.json`` and ``cross_site_table.md``
next to it, with the server's choice of the best global model (``bsf_model_selection.json`` of the run,
:mod:`bsf.fl.controller`: which round's model, its value, and whether it is the last one) when the run has one. :class:`CrossSiteResultsWriter` does that on the server at the end of the run (it
replaces the job's ``json_generator``); ``python -m bsf.fl.crosssite RUN_DIR`` does it afterwards.

Only scalar metrics are involved: they are what sites send.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from bsf.federation.run_folders import SELECTION_FILE
from bsf.io import atomic_write_json, atomic_write_text

RESULTS_FILE = "cross_val_results.json"
TABLE_JSON = "cross_site_table.json"
TABLE_MD = "cross_site_table.md"
SERVER_PREFIX = "SRV_"
MODEL_LABELS = {
    "SRV_FL_global_model.pt": "global (last round)",
    "SRV_best_FL_global_model.pt": "global (best validated)",
}


def _model_order(models: Sequence[str]) -> list[str]:
    server = [m for m in MODEL_LABELS if m in models]
    other_server = sorted(m for m in models if m.startswith(SERVER_PREFIX) and m not in MODEL_LABELS)
    sites = sorted(m for m in models if not m.startswith(SERVER_PREFIX))
    return server + other_server + sites


def model_label(name: str) -> str:
    """A readable row name: ``global (last round)``, ``global (best validated)``, ``site-1 (local)``."""
    if name in MODEL_LABELS:
        return MODEL_LABELS[name]
    if name.startswith(SERVER_PREFIX):
        return f"server {name[len(SERVER_PREFIX):]}"
    return f"{name} (local)"


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def cross_site_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], metric: str | None = None) -> dict[str, Any]:
    """Reorganise ``cross_val_results.json`` into per-metric tables.

    Returns ``{"metric": main metric, "metrics": [...], "models": [...], "sites": [...],
    "labels": {model: label}, "tables": {metric: {model: {site: value or None}}},
    "mean_over_sites": {metric: {model: mean or None}}}``. The main metric is ``metric`` when
    given, else ``val_dice_mean`` when present, else the first metric found.
    """
    sites = sorted(results)
    models = _model_order(sorted({m for per_site in results.values() for m in per_site}))
    names = sorted(
        {name for per_site in results.values() for values in per_site.values() for name in (values or {})}
    )
    main = metric or ("val_dice_mean" if "val_dice_mean" in names else (names[0] if names else None))
    if main is not None and main in names:
        names = [main] + [n for n in names if n != main]
    tables: dict[str, dict[str, dict[str, float | None]]] = {}
    means: dict[str, dict[str, float | None]] = {}
    for name in names:
        table = {m: {s: _number((results.get(s, {}).get(m) or {}).get(name)) for s in sites} for m in models}
        tables[name] = table
        means[name] = {}
        for m, row in table.items():
            values = [v for v in row.values() if v is not None]
            means[name][m] = sum(values) / len(values) if values else None
    return {
        "metric": main,
        "metrics": names,
        "models": models,
        "sites": sites,
        "labels": {m: model_label(m) for m in models},
        "tables": tables,
        "mean_over_sites": means,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def selection_summary(selection: Mapping[str, Any]) -> str | None:
    """One sentence on the server's best-model choice (a ``bsf_model_selection.json`` record), or None without one."""
    best = selection.get("best")
    if not best or best.get("value") is None:
        return None
    which = "the last global model" if selection.get("best_is_last") else f"not the last (round {selection.get('last_round')})"
    validated = "" if selection.get("last_model_validated") else "; the last global model was not validated"
    return (f"Best global model: the model after round {best['model_round']}, mean {selection['metric']} "
            f"{best['value']:.4f} over {len(best.get('sites') or {})} site(s), validated {best['validated']}: {which}"
            f"{validated}.")


def format_markdown(table: Mapping[str, Any], title: str | None = None, metrics: Sequence[str] | None = None) -> str:
    """Markdown: one table per metric (main metric first), rows = models, columns = sites + mean."""
    lines = [f"## {title}", ""] if title else []
    lines.append("Rows: the model evaluated; columns: the site whose validation cases were used.")
    summary = selection_summary(table.get("selection") or {})
    if summary:
        lines += ["", summary]
    for name in metrics or table["metrics"]:
        lines += ["", f"**{name}**" + (" (model selection metric)" if name == table["metric"] else ""), ""]
        lines.append("| model | " + " | ".join(table["sites"]) + " | mean |")
        lines.append("|---|" + "---:|" * (len(table["sites"]) + 1))
        for m in table["models"]:
            row = table["tables"][name][m]
            cells = [_fmt(row[s]) for s in table["sites"]] + [_fmt(table["mean_over_sites"][name][m])]
            lines.append(f"| {table['labels'][m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def find_results(path: str | os.PathLike) -> Path:
    """``cross_val_results.json`` from itself, its folder, a server run folder or a simulator workspace."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (
        path / RESULTS_FILE,
        path / "cross_site_val" / RESULTS_FILE,
        path / "simulate_job" / "cross_site_val" / RESULTS_FILE,
        path / "server" / "simulate_job" / "cross_site_val" / RESULTS_FILE,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {RESULTS_FILE} under {path} (was cross-site evaluation part of the job?)")


def write_cross_site_table(
    path: str | os.PathLike, out_dir: str | os.PathLike | None = None, metric: str | None = None, title: str | None = None
) -> tuple[Path, Path]:
    """Write ``cross_site_table.{json,md}`` (next to the results unless ``out_dir``); return both paths."""
    source = find_results(path)
    results = json.loads(source.read_text())
    table = cross_site_table(results, metric)
    selection = source.parent.parent / SELECTION_FILE  # <run dir>/cross_site_val/cross_val_results.json
    if selection.is_file():
        try:
            table["selection"] = json.loads(selection.read_text())
        except (OSError, ValueError):  # a report must not fail on a damaged record
            pass
    out = Path(out_dir) if out_dir is not None else source.parent
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / TABLE_JSON, out / TABLE_MD
    atomic_write_json(table, json_path)
    atomic_write_text(format_markdown(table, title or "Cross-site evaluation"), md_path)
    return json_path, md_path


# ------------------------------------------------------------------------------- NVFlare side
try:
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
except ImportError:  # pragma: no cover - the table functions above work without NVFlare
    ValidationJsonGenerator = object  # type: ignore[assignment,misc]


class CrossSiteResultsWriter(ValidationJsonGenerator):  # type: ignore[misc,valid-type]
    """NVFlare's ``ValidationJsonGenerator`` that also writes the cross-site table at the end of the run.

    Args:
        metric: the main metric of the table (the job's model-selection metric).
        results_dir, json_file_name: as ``ValidationJsonGenerator``'s.
    """

    def __init__(self, metric: str | None = None, results_dir: str = "cross_site_val", json_file_name: str = RESULTS_FILE):
        super().__init__(results_dir=results_dir, json_file_name=json_file_name)
        self.metric = metric
        self.results_dir = results_dir
        self.json_file_name = json_file_name

    def handle_event(self, event_type: str, fl_ctx: "FLContext"):
        super().handle_event(event_type, fl_ctx)
        if event_type != EventType.END_RUN or not self._val_results:
            return
        try:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            json_path, md_path = write_cross_site_table(
                os.path.join(run_dir, self.results_dir, self.json_file_name), metric=self.metric
            )
            self.log_info(fl_ctx, f"cross-site table written to {md_path} and {json_path}")
        except Exception as exc:  # a report must never fail the run
            self.log_warning(fl_ctx, f"could not write the cross-site table: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsf.fl.crosssite", description="Write the cross-site evaluation table (markdown + JSON).")
    parser.add_argument("path", help="cross_val_results.json, a server run folder or a simulator workspace")
    parser.add_argument("--out", help="output folder (default: next to cross_val_results.json)")
    parser.add_argument("--metric", help="main metric (default: val_dice_mean when present)")
    args = parser.parse_args(argv)
    json_path, md_path = write_cross_site_table(args.path, args.out, args.metric)
    print(md_path.read_text())
    print(f"written: {md_path}, {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
