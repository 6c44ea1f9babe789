"""Per-sample HTML reports and the multi-sample summary: metrics, papermill notebooks, nbconvert.

A report is built in three steps, each usable on its own:

1. :func:`write_sample_metrics` evaluates ``corrected.h5ad`` (:func:`undiffuse.metrics.evaluate_sample`) and
   writes ``metrics/*.tsv`` and ``metrics/metrics.json``;
2. :func:`execute_notebook` runs the parameterised notebook ``undiffuse/notebooks/report.ipynb`` with
   papermill in a kernel of the running interpreter, so the executed notebook is a real output;
3. :func:`notebook_to_html` converts it to one self-contained HTML file: code hidden, figures embedded as
   base64 PNG, no script fetched from the network.

:func:`build_report` chains the three; :func:`build_summary` does the same across samples. The notebooks stay
thin: they call :class:`ReportInputs`, :func:`show_table`, :class:`FigureSaver` and the figures of
:mod:`undiffuse.plotting.report`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .atomic import atomic_path
from .correct import KEY, PARAMETER_COLUMNS, parameter_column
from .errors import InputError, require_extra
from .io.h5ad import read_h5ad
from .metrics import Rediffuse
from .package_data import REPORT_NOTEBOOK, SUMMARY_NOTEBOOK
from .spatial import TISSUE_KEYS

#: Kernel name recorded in the executed notebooks; it always runs the interpreter that builds the report.
KERNEL_NAME = "python3"

#: Significant digits of the numbers printed in report tables.
SIGNIFICANT_DIGITS = 4

#: Key figures of a sample report, saved as PNG next to it (``snakemake --report`` shows them).
KEY_FIGURES = ("before_after", "cell_types", "kernel", "loss")

#: Correction settings the report lists under the learned diffusion (resolved values, as the correction ran).
MODEL_SETTINGS = (
    "operator",
    "programmes",
    "programme_updates",
    "programmes_held_out_deviance",
    "programmes_own_field_genes",
    "reference_types",
    "prior_strength",
    "prior_weights",
    "poisson_spots",
    "epochs",
    "em_iterations",
    "final_em_iterations",
    "trained_on_spots",
    "device",
)

#: Stages of the summary table, in column order.
STAGE_ORDER = ("raw", "corrected", "rediffused", "truth")

#: nbconvert template: JupyterLab's look, minus the scripts it would load from a CDN (require.js, MathJax,
#: mermaid), which a report neither needs nor may fetch on an offline cluster.
_SELF_CONTAINED_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


@dataclass(frozen=True)
class ReportOutputs:
    """Paths written by :func:`build_report`."""

    metrics_dir: Path
    notebook: Path
    html: Path
    figures_dir: Path


def build_report(
    corrected: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    qc_dir: str | os.PathLike[str] | None = None,
    truth: str | os.PathLike[str] | None = None,
    markers: str | os.PathLike[str] | None = None,
    sample: str | None = None,
    rediffuse: Rediffuse | None = None,
) -> ReportOutputs:
    """Metrics, executed notebook, HTML report and key figures of one sample.

    Parameters
    ----------
    corrected
        ``results/{sample}/corrected.h5ad``.
    outdir
        Folder of the outputs: ``metrics/``, ``report.ipynb``, ``report.html``, ``figures/*.png``.
    qc_dir
        The ``qc/`` folder of the prepare step; without it the QC section says so.
    truth
        The simulator's ``truth.h5ad``, when the sample is simulated.
    markers
        Marker table (e.g. ``undiffuse/markers/*.tsv``) for the cell-type maps.
    sample
        Name shown in the report (default: the name of ``outdir``).
    rediffuse
        Re-diffusion of the corrected field for the consistency check (default:
        :func:`undiffuse.correct.rediffuse`).

    Returns
    -------
    The paths written. Each output appears only once complete.
    """
    _require_report_extra()
    outdir = Path(outdir)
    outputs = ReportOutputs(
        outdir / "metrics", outdir / "report.ipynb", outdir / "report.html", outdir / "figures"
    )
    write_sample_metrics(corrected, outputs.metrics_dir, truth=truth, markers=markers, rediffuse=rediffuse)
    parameters = {
        "sample": sample or outdir.resolve().name,
        "corrected": _path_parameter(corrected),
        "qc_dir": _path_parameter(qc_dir),
        "metrics_dir": _path_parameter(outputs.metrics_dir),
        "truth": _path_parameter(truth),
        "markers": _path_parameter(markers),
    }
    try:
        with atomic_path(outputs.figures_dir, directory=True) as figures_tmp:
            parameters["figures_dir"] = str(figures_tmp.resolve())
            execute_notebook(REPORT_NOTEBOOK, outputs.notebook, parameters)
        notebook_to_html(outputs.notebook, outputs.html, title=f"undiffuse report: {parameters['sample']}")
    except BaseException:
        # A report is one output set: without its HTML, the metrics and figures of this run go too.
        for path in (outputs.metrics_dir, outputs.figures_dir):
            shutil.rmtree(path, ignore_errors=True)
        outputs.notebook.unlink(missing_ok=True)
        raise
    return outputs


def _require_report_extra() -> None:
    """Stop before any work when the packages of the ``report`` extra are missing."""
    for package in ("papermill", "nbconvert", "nbformat", "ipykernel"):
        require_extra(package, "report")


def build_summary(
    metrics_dirs: Mapping[str, str | os.PathLike[str]],
    html: str | os.PathLike[str],
    *,
    notebook: str | os.PathLike[str] | None = None,
    reports: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """The multi-sample summary: one table and figures across samples, as HTML (and the executed notebook).

    Parameters
    ----------
    metrics_dirs
        ``{sample: results/{sample}/metrics}``.
    html
        Output HTML (``results/summary.html``).
    notebook
        Where to keep the executed notebook (default: next to ``html``, ``.ipynb`` suffix).
    reports
        ``{sample: report.html}`` to link from the summary (linked relative to ``html``).
    """
    _require_report_extra()
    html = Path(html)
    notebook = Path(notebook) if notebook is not None else html.with_suffix(".ipynb")
    for sample, folder in metrics_dirs.items():
        if not (Path(folder) / "summary.tsv").is_file():
            raise InputError(folder, f"metrics of sample {sample!r} not found (no summary.tsv)")
    links = {
        sample: os.path.relpath(Path(path).resolve(), html.resolve().parent)
        for sample, path in (reports or {}).items()
    }
    parameters = {
        "metrics_dirs": json.dumps({s: _path_parameter(p) for s, p in metrics_dirs.items()}),
        "reports": json.dumps(links),
    }
    execute_notebook(SUMMARY_NOTEBOOK, notebook, parameters)
    return notebook_to_html(notebook, html, title="undiffuse summary")


def write_sample_metrics(
    corrected: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    truth: str | os.PathLike[str] | None = None,
    markers: str | os.PathLike[str] | None = None,
    rediffuse: Rediffuse | None = None,
) -> dict[str, pd.DataFrame]:
    """Evaluate ``corrected.h5ad`` (with its truth and markers when given) and write ``outdir/*.tsv``.

    Raises
    ------
    InputError
        Naming the file at fault when an input is missing, unreadable or does not fit the others.
    """
    from .celltypes import read_markers
    from .metrics import align_truth, evaluate_sample, write_metrics

    corrected_path = Path(corrected)
    adata = read_corrected(corrected_path)
    truth_adata = read_h5ad(truth, "ground truth") if truth else None
    marker_table = read_markers(markers) if markers else None
    if truth_adata is not None:
        try:
            align_truth(adata, truth_adata)
        except ValueError as err:
            raise InputError(truth, f"does not fit {corrected_path}: {err}") from err
    try:
        tables = evaluate_sample(adata, truth=truth_adata, markers=marker_table, rediffuse=rediffuse)
    except ValueError as err:
        raise InputError(corrected_path, f"cannot evaluate the sample: {err}") from err
    write_metrics(tables, outdir)
    return tables


def read_corrected(path: str | os.PathLike[str]) -> AnnData:
    """Read ``corrected.h5ad`` and check the parts the report needs (raw counts, mask, positions)."""
    adata = read_h5ad(path, "corrected sample")
    problems = []
    if "corrected" not in adata.layers:
        problems.append("layers['corrected'] (corrected counts)")
    if not set(TISSUE_KEYS) & set(adata.obs.columns):
        problems.append("obs['tissue'] (tissue mask)")
    if not {"array_row", "array_col"} <= set(adata.obs.columns):
        problems.append("obs['array_row'] and obs['array_col']")
    if "spatial" not in adata.obsm:
        problems.append("obsm['spatial'] (spot positions)")
    if problems:
        raise InputError(path, "not a corrected sample: missing " + ", ".join(problems))
    return adata


@contextmanager
def current_python_kernel() -> Iterator[str]:
    """Make the kernel :data:`KERNEL_NAME` run this interpreter while the block runs; yields its name.

    A kernel spec named ``python3`` elsewhere on the Jupyter path (a user-wide one, another environment's)
    could start a different Python without this package. A temporary spec that runs ``sys.executable`` is put
    first on ``JUPYTER_PATH``, which takes precedence over every other location, and removed afterwards.
    """
    previous = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory(prefix="undiffuse-kernel-") as root:
        spec_dir = Path(root) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "metadata": {"debugger": False},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        os.environ["JUPYTER_PATH"] = os.pathsep.join([root, *([previous] if previous else [])])
        try:
            yield KERNEL_NAME
        finally:
            if previous is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = previous


def execute_notebook(
    template: str | os.PathLike[str],
    output: str | os.PathLike[str],
    parameters: Mapping[str, object],
    *,
    timeout: int = 1800,
) -> Path:
    """Run a parameterised notebook with papermill and write the executed notebook atomically.

    Parameters
    ----------
    template
        Notebook with a cell tagged ``parameters``.
    output
        Executed notebook; written only when every cell ran without error.
    parameters
        Values injected after the ``parameters`` cell.
    timeout
        Seconds a single cell may run.

    Raises
    ------
    RuntimeError
        A cell failed; the message carries the error and the cell's traceback.
    """
    import papermill

    template = Path(template)
    if not template.is_file():
        raise InputError(template, "notebook template not found")
    output = Path(output)
    with atomic_path(output) as tmp, current_python_kernel() as kernel_name:
        try:
            papermill.execute_notebook(
                str(template),
                str(tmp),
                parameters=dict(parameters),
                kernel_name=kernel_name,
                progress_bar=False,
                cwd=str(output.parent.resolve()),
                execution_timeout=timeout,
            )
        except papermill.PapermillExecutionError as err:
            raise RuntimeError(
                f"{template.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}"
            ) from err
    return output


def notebook_errors(notebook: str | os.PathLike[str]) -> list[str]:
    """Errors recorded in the outputs of an executed notebook (empty when every cell ran cleanly)."""
    import nbformat

    nb = nbformat.read(Path(notebook), as_version=4)
    return [
        f"{output.get('ename')}: {output.get('evalue')}"
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]


def notebook_to_html(
    notebook: str | os.PathLike[str], html: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Convert an executed notebook to self-contained HTML with the code hidden (nbconvert ``--no-input``).

    Figures are embedded as base64 PNG and no script is loaded from the network, so the file can be mailed,
    archived or opened offline.
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = nbformat.read(Path(notebook), as_version=4)
    if title:
        nb.metadata["title"] = title
    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({"undiffuse.html.j2": _SELF_CONTAINED_TEMPLATE})],
        template_file="undiffuse.html.j2",
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
    )
    body, _ = exporter.from_notebook_node(nb)
    html = Path(html)
    with atomic_path(html) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return html


def format_value(value: object) -> str:
    """How report tables print a value: floats to :data:`SIGNIFICANT_DIGITS` significant digits."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.{SIGNIFICANT_DIGITS}g}"
    return "" if value is None else str(value)


def table_html(frame: pd.DataFrame, name: str, *, caption: str | None = None) -> str:
    """HTML of a table, its element id ``table-{name}`` so that tests and readers can find it."""
    shown = frame.copy()
    for column in shown.columns:
        shown[column] = [format_value(v) for v in shown[column]]
    body = shown.to_html(table_id=f"table-{name}", classes="undiffuse-table", escape=True, border=0)
    caption_html = f'<p class="undiffuse-caption"><b>{escape(caption)}</b></p>' if caption else ""
    return caption_html + body


def show_table(frame: pd.DataFrame, name: str, *, caption: str | None = None) -> None:
    """Display a table in a notebook (see :func:`table_html`)."""
    from IPython.display import HTML, display

    display(HTML(table_html(frame, name, caption=caption)))


def inputs_table(**paths: str) -> pd.DataFrame:
    """The input files of a report, one row each (``-`` for an absent one)."""
    return pd.DataFrame({"file": {name: path or "-" for name, path in paths.items()}}).rename_axis("input")


def show_markdown(text: str) -> None:
    """Display Markdown in a notebook."""
    from IPython.display import Markdown, display

    display(Markdown(text))


class FigureSaver:
    """Show figures in a notebook and keep the key ones as PNG files.

    Parameters
    ----------
    folder
        Where to write ``{name}.png`` for the names in ``keep``; empty to write nothing.
    keep
        Names of the figures to write.
    """

    def __init__(self, folder: str | os.PathLike[str] | None, keep: tuple[str, ...] = KEY_FIGURES) -> None:
        self.folder = Path(folder) if folder else None
        self.keep = keep

    def __call__(self, fig, name: str) -> None:
        from IPython.display import display

        if self.folder is not None and name in self.keep:
            self.folder.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.folder / f"{name}.png", dpi=100)
        display(fig)


def show_image(path: str | os.PathLike[str], *, caption: str | None = None) -> None:
    """Display a PNG file in a notebook (embedded, so that the HTML report carries it)."""
    from IPython.display import Image, display

    if caption:
        show_markdown(f"*{caption}*")
    display(Image(filename=str(path)))


@dataclass
class ReportInputs:
    """Everything the report notebook shows, loaded from the workflow's files of one sample.

    Only ``corrected`` and ``metrics_dir`` are required; a section whose input is absent says so. Everything
    per gene (selection, initial quantiles, learned parameters, Moran's I) is read from ``corrected.h5ad``.
    """

    sample: str
    corrected: AnnData
    metrics: dict[str, pd.DataFrame]
    qc: dict[str, object] = field(default_factory=dict)
    qc_dir: Path | None = None

    @classmethod
    def load(
        cls,
        *,
        sample: str,
        corrected: str,
        metrics_dir: str,
        qc_dir: str = "",
    ) -> ReportInputs:
        """Load the inputs; empty strings stand for absent files (papermill parameters are strings)."""
        from .metrics import read_metrics

        qc_path = Path(qc_dir) / "qc.json" if qc_dir else None
        return cls(
            sample=sample,
            corrected=read_corrected(corrected),
            metrics=read_metrics(metrics_dir),
            qc=json.loads(qc_path.read_text()) if qc_path is not None and qc_path.is_file() else {},
            qc_dir=Path(qc_dir) if qc_dir else None,
        )

    def header(self) -> str:
        """Markdown title and one line on the sample's size."""
        from .metrics import corrected_gene_mask
        from .spatial import tissue_spots

        n_tissue, n_corrected = (
            int(tissue_spots(self.corrected).sum()),
            int(corrected_gene_mask(self.corrected).sum()),
        )
        return (
            f"# Diffusion correction report: {self.sample}\n\n"
            f"{self.corrected.n_obs} spots ({n_tissue} in tissue), {self.corrected.n_vars} genes "
            f"({n_corrected} corrected, {self.corrected.n_vars - n_corrected} passed through)."
        )

    def qc_figures(self) -> list[Path]:
        """PNG figures of the prepare step (``qc/*.png``): mask, decay and counts first, then any other."""
        if self.qc_dir is None or not self.qc_dir.is_dir():
            return []
        first = ("tissue_mask.png", "background_decay.png", "total_counts.png")
        found = sorted(
            self.qc_dir.glob("*.png"), key=lambda p: (first.index(p.name) if p.name in first else 9, p.name)
        )
        return found

    def qc_table(self) -> pd.DataFrame:
        """The scalar QC metrics of ``qc.json`` as a two-column table."""
        rows = [(k, v) for k, v in self.qc.items() if isinstance(v, int | float | str | bool)]
        return pd.DataFrame(rows, columns=["qc metric", "value"]).set_index("qc metric")

    def gene_selection(self) -> pd.DataFrame:
        """How many genes the prepare step read and selected for correction."""
        source = self.corrected
        selected = source.var["selected"].astype(bool) if "selected" in source.var else None
        rows = {"genes read": source.n_vars}
        if selected is not None:
            rows["genes selected for correction"] = int(selected.sum())
        return pd.DataFrame({"genes": rows}).rename_axis("")

    def quantiles(self) -> pd.DataFrame:
        """The quantile scan of the selected genes (``q_init``, ``moran_at_q_init``, ``moran_raw``), as the
        merge stored it in ``var``; empty when the sample holds no scan."""
        from .merge import MORAN_AT_Q_INIT, MORAN_RAW
        from .metrics import corrected_gene_mask

        var = self.corrected.var
        if MORAN_AT_Q_INIT not in var:
            return pd.DataFrame()
        scanned = var["selected"].to_numpy(bool) if "selected" in var else corrected_gene_mask(self.corrected)
        return pd.DataFrame(
            {
                "q_init": var[parameter_column("q_init")],
                "moran_at_q_init": var[MORAN_AT_Q_INIT],
                "moran_raw": var[MORAN_RAW],
            }
        )[scanned]

    def diffusion_lengths(self) -> pd.Series:
        """Learned diffusion length of each corrected gene (pitches)."""
        from .metrics import corrected_gene_mask

        column = parameter_column("diffusion_length")
        var = self.corrected.var
        if column not in var:
            return pd.Series(dtype=np.float64)
        return var.loc[corrected_gene_mask(self.corrected), column].astype(np.float64)

    def pitch_um(self) -> float:
        """Centre-to-centre distance of the sample's spots or bins in microns (:func:`undiffuse.qc.spot_pitch_um`)."""
        from .qc import spot_pitch_um

        return float(spot_pitch_um(self.corrected))

    def diffusion_lengths_um(self) -> pd.DataFrame:
        """Learned diffusion length of each corrected gene in microns, with its bleeding shares; longest first."""
        from .metrics import corrected_gene_mask

        var = self.corrected.var.loc[corrected_gene_mask(self.corrected)]
        lengths = self.diffusion_lengths()
        if lengths.empty:
            return pd.DataFrame(columns=["diffusion_length_um"])
        table = pd.DataFrame({"diffusion_length_um": lengths * self.pitch_um()}, index=var.index)
        for name in ("bleed", "distal"):
            if parameter_column(name) in var:
                table[name] = var[parameter_column(name)].astype(np.float64)
        table.index.name = "gene"
        return table.sort_values("diffusion_length_um", ascending=False)

    def _correction(self) -> Mapping[str, object]:
        return self.corrected.uns.get("undiffuse", {}).get("correction", {})

    def kernel_profile(self) -> pd.DataFrame:
        """``uns['undiffuse']['correction']['kernel_profile']`` as one table (a ``chunk`` column when merged
        from chunks)."""
        return _as_table(self._correction().get("kernel_profile"))

    def loss_history(self) -> dict[str, pd.DataFrame]:
        """``uns['undiffuse']['correction']['loss_history']`` as ``{chunk: table}``.

        Accepts the merged layout (one table with a ``chunk`` column), a mapping of chunk to table, or one
        chunk's table (a mapping of column to values).
        """
        history = self._correction().get("loss_history")
        if (
            isinstance(history, Mapping)
            and history
            and all(isinstance(v, Mapping | pd.DataFrame) for v in history.values())
        ):
            return {str(chunk): _as_table(table) for chunk, table in history.items()}
        table = _as_table(history)
        if "chunk" in table:
            return {str(chunk): part.drop(columns="chunk") for chunk, part in table.groupby("chunk")}
        return {"all genes": table} if len(table) else {}

    def parameter_summary(self) -> pd.DataFrame:
        """Quartiles of the learned per-gene parameters over the corrected genes."""
        from .metrics import corrected_gene_mask

        var = self.corrected.var.loc[corrected_gene_mask(self.corrected)]
        columns = {
            parameter_column(name): name for name in PARAMETER_COLUMNS if parameter_column(name) in var
        }
        if var.empty or not columns:
            return pd.DataFrame()
        learned = var[list(columns)].rename(columns=columns).astype(np.float64)
        table = learned.describe(percentiles=[0.25, 0.5, 0.75])
        return table.loc[["min", "25%", "50%", "75%", "max"]].T

    def model_settings(self) -> pd.DataFrame:
        """The settings of the correction that shape its model (the first chunk's, which all chunks share, but
        for the rank of the low-rank model, which each chunk may choose from its genes' counts, and which is at
        most the genes of a chunk)."""
        config = self.corrected.uns.get(KEY, {}).get("correction", {}).get("config", {})
        shown = {name: config[name] for name in MODEL_SETTINGS if name in config}
        types = str(shown.get("reference_types", "none"))
        if types != "none":
            shown["reference_types"] = (
                f"{len(types.split(','))} ({types.replace(',', ', ')}): the prior is centred on their mixture"
            )
        if shown.get("programmes") in (0, "0") and types == "none":
            shown["programmes"] = "0 (each gene on its own, under the smoothness prior)"
        return pd.DataFrame(
            {"value": [str(value) for value in shown.values()]}, index=pd.Index(shown, name="setting")
        )

    def most_changed_genes(self, n: int) -> list[str]:
        """The ``n`` corrected genes that the correction moved most (largest ``relative_change``)."""
        genes = self.metrics["genes"]
        changed = genes[~genes["passed_through"].astype(str).str.lower().eq("true")]
        return list(changed.sort_values("relative_change", ascending=False).index[:n])

    def summary_table(self) -> pd.DataFrame:
        """The summary metrics, one row per metric and one column per stage, with what each measures."""
        return summary_wide(self.metrics["summary"])

    def notes(self) -> str:
        """Markdown list of the metrics that could not be computed, and why (empty when none)."""
        notes = self.metrics.get("notes", pd.DataFrame())
        return "\n".join(f"- **{topic}**: {row['note']}" for topic, row in notes.iterrows())

    def cell_types(self) -> pd.DataFrame:
        """``metrics/cell_types.tsv`` (empty without a marker table)."""
        return self.metrics.get("cell_types", pd.DataFrame())

    def cell_type_counts(self) -> pd.DataFrame:
        """Tissue spots per cell type, before and after correction."""
        table = self.cell_types()
        stages = [c.removeprefix("cell_type_") for c in table.columns if c.startswith("cell_type_")]
        counts = {stage: table[f"cell_type_{stage}"].value_counts() for stage in stages}
        return pd.DataFrame(counts).fillna(0).astype(int).rename_axis("cell type")


def summary_wide(summary: pd.DataFrame) -> pd.DataFrame:
    """Long summary (``metric``, ``stage``, ``value``) as one row per metric, one column per stage.

    Stages a metric lacks are left empty (``""``), and a ``measures`` column says what each metric is.
    """
    from .metrics import METRIC_DESCRIPTIONS

    metrics = list(dict.fromkeys(summary["metric"]))
    stages = [s for s in STAGE_ORDER if (summary["stage"] == s).any()]
    stages += [s for s in dict.fromkeys(summary["stage"]) if s not in stages]
    wide = summary.pivot_table(index="metric", columns="stage", values="value", aggfunc="first")
    wide = wide.reindex(index=metrics, columns=stages).astype(object).where(wide.notna(), "")
    wide["measures"] = [METRIC_DESCRIPTIONS.get(m, "") for m in metrics]
    wide.columns.name = None
    return wide


def collect_summaries(metrics_dirs: Mapping[str, str | os.PathLike[str]]) -> pd.DataFrame:
    """The summary tables of several samples stacked: ``sample``, ``metric``, ``stage``, ``value``."""
    from .metrics import read_metrics

    frames = [
        read_metrics(folder)["summary"].assign(sample=sample) for sample, folder in metrics_dirs.items()
    ]
    if not frames:
        return pd.DataFrame(columns=["sample", "metric", "stage", "value"])
    return pd.concat(frames, ignore_index=True)[["sample", "metric", "stage", "value"]]


def summary_by_sample(long: pd.DataFrame) -> pd.DataFrame:
    """One row per sample, one column per ``metric (stage)``; combinations a sample lacks stay empty."""
    metric_order = {metric: k for k, metric in enumerate(dict.fromkeys(long["metric"]))}
    stage_order = {stage: k for k, stage in enumerate((*STAGE_ORDER, *dict.fromkeys(long["stage"])))}
    columns = sorted(
        dict.fromkeys(zip(long["metric"], long["stage"], strict=True)),
        key=lambda pair: (metric_order[pair[0]], stage_order[pair[1]]),
    )
    wide = long.pivot_table(index="sample", columns=["metric", "stage"], values="value", aggfunc="first")
    wide = wide.reindex(index=list(dict.fromkeys(long["sample"])), columns=pd.MultiIndex.from_tuples(columns))
    wide = wide.astype(object).where(wide.notna(), "")
    wide.columns = [f"{metric} ({stage})" for metric, stage in wide.columns]
    return wide


def _as_table(value: object) -> pd.DataFrame:
    """A table stored in ``uns``: a DataFrame, or a mapping of column to values (``to_anndata``'s layout)."""
    if value is None:
        return pd.DataFrame()
    if isinstance(value, pd.DataFrame):
        return value
    return pd.DataFrame({key: np.asarray(column) for key, column in dict(value).items()})


def _path_parameter(path: str | os.PathLike[str] | None) -> str:
    return str(Path(path).resolve()) if path else ""
