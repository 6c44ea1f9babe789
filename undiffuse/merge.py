"""Merge the chunk outputs of a sample into ``corrected.h5ad`` and ``parameters.tsv``.

Each chunk holds the corrected values of its genes on all spots (``CorrectionResult.to_anndata``). The
merged AnnData has every gene of ``prepared.h5ad``: corrected genes take their corrected values, the others
pass through as raw counts. Because the correction treats every gene on its own, the merge of any chunking
equals one direct ``undiffuse.correct`` call on all genes.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .atomic import atomic_path
from .errors import InputError
from .moran import gene_morans_i, read_quantile_table, spatial_weights

#: Learned per-gene parameters, as in ``CorrectionResult.params``.
PARAMETER_COLUMNS = ("q_init", "q", "r", "diffusion_length", "bleed", "distal", "prior_strength")

#: Learned values of a gene that passes through: 0, the identity model (nothing bleeds, no threshold).
PASS_THROUGH_VALUE = 0.0

#: Columns of ``parameters.tsv`` after ``gene``.
PARAMETER_TABLE_COLUMNS = (*PARAMETER_COLUMNS, "moran_before", "moran_after", "passed_through")


def merge_chunks(prepared: AnnData, chunks: Sequence[AnnData]) -> AnnData:
    """Put the corrected genes of the chunks back among all genes of the prepared sample.

    Parameters
    ----------
    prepared
        The prepared sample: raw counts of all genes on all spots.
    chunks
        Chunk AnnDatas (``CorrectionResult.to_anndata``) on the same spots in the same order, with disjoint
        genes.

    Returns
    -------
    AnnData with all spots and genes of ``prepared``:

    - ``X`` and ``layers['corrected']``: corrected values (raw counts for genes in no chunk), CSR float32;
    - ``layers['counts']``: raw counts;
    - ``var``: the prepared columns plus the learned parameters of the chunks (:data:`PARAMETER_COLUMNS` and
      any other numeric column, e.g. the cost coefficients ``phi_*``; 0 for passed-through genes, which is
      the identity model), ``moran_before`` and ``moran_after`` (Moran's I of counts and of ``X`` over all
      spots, first-ring graph) and ``passed_through``;
    - ``uns``: the prepared ``uns`` (``spatial`` included), ``loss_history`` and ``kernel_profile`` of all
      chunks with a ``chunk`` column, and the chunks' resolved ``correction`` settings (so that
      ``undiffuse.correct.rediffuse`` works on the corrected genes).
    """
    counts = sp.csc_matrix(prepared.X, dtype=np.float32)
    position = pd.Series(np.arange(prepared.n_vars), index=prepared.var_names)
    corrected_columns: list[sp.csc_matrix] = []
    corrected_positions: list[np.ndarray] = []
    learned: list[pd.DataFrame] = []
    passed_through = np.ones(prepared.n_vars, dtype=bool)

    for number, chunk in enumerate(chunks):
        if not chunk.obs_names.equals(prepared.obs_names):
            raise ValueError(f"chunk {number} does not hold the prepared spots in the prepared order")
        unknown = chunk.var_names.difference(prepared.var_names)
        if len(unknown):
            raise ValueError(f"chunk {number} has genes that the prepared sample lacks: {list(unknown[:5])}")
        missing = [column for column in PARAMETER_COLUMNS if column not in chunk.var]
        if missing:
            raise ValueError(f"chunk {number} lacks the parameter columns {missing}")
        where = position[chunk.var_names].to_numpy()
        if not passed_through[where].all():
            raise ValueError(f"chunk {number} repeats genes of an earlier chunk")
        passed_through[where] = False
        values = chunk.layers["corrected"] if "corrected" in chunk.layers else chunk.X
        # Sparse at once: corrected values are zero off tissue, and Visium HD chunks hold millions of bins.
        corrected_columns.append(sp.csc_matrix(values, dtype=np.float32))
        corrected_positions.append(where)
        learned.append(chunk.var.select_dtypes(include=[np.number]).astype(np.float64))

    corrected = _replace_columns(counts, corrected_positions, corrected_columns).tocsr()
    counts = counts.tocsr()
    _require_finite(corrected, "corrected values")

    merged = AnnData(
        X=corrected,
        obs=prepared.obs.copy(),
        var=prepared.var.copy(),
        obsm={key: value.copy() for key, value in prepared.obsm.items()},
        uns=dict(prepared.uns),
        layers={"counts": counts, "corrected": corrected.copy()},
    )
    parameters = pd.concat([pd.DataFrame(columns=list(PARAMETER_COLUMNS), dtype=np.float64), *learned])
    parameters = parameters.reindex(prepared.var_names).fillna(PASS_THROUGH_VALUE)
    for column in parameters.columns:
        merged.var[column] = parameters[column].to_numpy(dtype=np.float64)
    weights = spatial_weights(merged)
    merged.var["moran_before"] = gene_morans_i(merged, layer="counts", weights=weights).to_numpy()
    merged.var["moran_after"] = gene_morans_i(merged, weights=weights).to_numpy()
    merged.var["passed_through"] = passed_through
    for key in ("loss_history", "kernel_profile"):
        frames = [_chunk_frame(chunk, key, number) for number, chunk in enumerate(chunks)]
        frames = [frame for frame in frames if frame is not None]
        if frames:
            merged.uns[key] = pd.concat(frames, ignore_index=True)
    if chunks and "correction" in chunks[0].uns:
        settings = dict(chunks[0].uns["correction"])
        settings.pop("wall_time_s", None)  # per chunk; the provenance has the wall times
        merged.uns["correction"] = settings
    return merged


def merge_sample(
    prepared: str | PathLike[str],
    chunks: Sequence[str | PathLike[str]],
    quantiles: str | PathLike[str],
    output: str | PathLike[str],
    parameters: str | PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    wall_times: Mapping[str, float] | None = None,
) -> AnnData:
    """Merge a sample's chunk files, add provenance, and write ``corrected.h5ad`` and ``parameters.tsv``.

    Parameters
    ----------
    prepared, chunks, quantiles
        ``prepared.h5ad``, the chunk ``.h5ad`` files and ``quantiles.tsv`` of one sample. The chunks must
        cover exactly the genes of ``quantiles.tsv``.
    output, parameters
        Files to write (atomically).
    config
        The resolved workflow config, stored in the provenance.
    wall_times
        Seconds per workflow step (e.g. from :func:`read_wall_times`), stored in the provenance.

    Returns
    -------
    The merged AnnData, as written.

    Raises
    ------
    InputError
        A file is missing or breaks the chunk contract, or the chunks do not cover the genes to correct.
    """
    prepared_adata = _read_h5ad(prepared, "prepared sample")
    expected = list(read_quantile_table(quantiles).index)
    chunk_adatas = [_read_h5ad(path, "chunk") for path in chunks]
    covered = [gene for chunk in chunk_adatas for gene in chunk.var_names]
    if sorted(covered) != sorted(expected):
        missing = sorted(set(expected) - set(covered))
        extra = sorted(set(covered) - set(expected))
        raise InputError(
            quantiles,
            f"the {len(chunks)} chunks do not cover its genes: missing {missing[:5]}, unexpected {extra[:5]}",
        )
    try:
        merged = merge_chunks(prepared_adata, chunk_adatas)
    except ValueError as err:
        raise InputError(Path(chunks[0]).parent if chunks else prepared, str(err)) from err
    merged.uns["undiffuse"] = {
        **dict(merged.uns.get("undiffuse", {})),
        "provenance": provenance(config=config, wall_times=wall_times),
    }
    write_outputs(merged, output, parameters)
    return merged


def provenance(
    *, config: Mapping[str, Any] | None = None, wall_times: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """What produced a merged sample: versions, the resolved config (as JSON text), seed and wall times.

    ``wall_times_s`` holds seconds per step and, summed over chunks, ``correct_chunk_total``.
    """
    import torch

    from . import __version__

    times = {str(step): float(seconds) for step, seconds in (wall_times or {}).items()}
    chunk_times = [seconds for step, seconds in times.items() if step.startswith("correct_chunk_")]
    if chunk_times:
        times["correct_chunk_total"] = float(sum(chunk_times))
    config = dict(config or {})
    return {
        "package_version": __version__,
        "python_version": platform.python_version(),
        "torch_version": str(torch.__version__),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": json.dumps(config, sort_keys=True, default=str),
        "seed": int(config.get("correct", {}).get("seed", 0)),
        "wall_times_s": times,
    }


def read_wall_times(benchmarks: Mapping[str, str | PathLike[str]]) -> dict[str, float]:
    """Wall-clock seconds per step from Snakemake benchmark files (column ``s``; several runs are summed)."""
    times = {}
    for step, path in benchmarks.items():
        table = pd.read_csv(path, sep="\t")
        if "s" not in table.columns:
            raise InputError(path, "not a Snakemake benchmark file: no column 's'")
        times[step] = float(table["s"].sum())
    return times


def parameter_table(merged: AnnData) -> pd.DataFrame:
    """The per-gene table of ``parameters.tsv``: gene, learned parameters, Moran's I, pass-through flag."""
    table = merged.var[list(PARAMETER_TABLE_COLUMNS)].copy()
    table.index.name = "gene"
    return table.reset_index()


def write_outputs(merged: AnnData, output: str | PathLike[str], parameters: str | PathLike[str]) -> None:
    """Write ``corrected.h5ad`` and ``parameters.tsv`` atomically, after checking for NaN and Inf."""
    _require_finite(merged.X, "X")
    for name, layer in merged.layers.items():
        _require_finite(layer, f"layer {name!r}")
    numeric = merged.var.select_dtypes(include=[np.number])
    if not np.isfinite(numeric.to_numpy(dtype=np.float64)).all():
        raise ValueError("the merged var table holds NaN or Inf")
    table = parameter_table(merged)
    with atomic_path(output) as tmp:
        merged.write_h5ad(tmp, compression="gzip")
    with atomic_path(parameters) as tmp:
        # The learned parameters are float32: seven significant digits are all they hold.
        table.to_csv(tmp, sep="\t", index=False, float_format="%.7g")


def _replace_columns(
    counts: sp.csc_matrix, positions: Sequence[np.ndarray], columns: Sequence[np.ndarray | sp.spmatrix]
) -> sp.csc_matrix:
    """``counts`` with the columns at ``positions`` replaced by the ``columns`` blocks (dense or sparse)."""
    if not positions:
        return counts.copy()
    replaced = np.concatenate(positions)
    kept = np.setdiff1d(np.arange(counts.shape[1]), replaced)
    blocks = sp.hstack([counts[:, kept], *(sp.csc_matrix(block) for block in columns)], format="csc")
    order = np.argsort(np.concatenate([kept, replaced]), kind="stable")
    return blocks[:, order]


def _chunk_frame(chunk: AnnData, key: str, number: int) -> pd.DataFrame | None:
    frame = chunk.uns.get(key)
    if frame is None:
        return None
    frame = pd.DataFrame(frame).copy()
    frame.insert(0, "chunk", int(chunk.uns.get("chunk", {}).get("index", number)))
    return frame


def _read_h5ad(path: str | PathLike[str], what: str) -> AnnData:
    if not Path(path).is_file():
        raise InputError(path, f"{what} not found")
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as err:
        raise InputError(path, f"cannot read the {what} as h5ad: {err}") from err


def _require_finite(values: np.ndarray | sp.spmatrix | sp.sparray, what: str) -> None:
    data = values.data if sp.issparse(values) else np.asarray(values)
    if not np.isfinite(data).all():
        raise ValueError(f"{what} hold NaN or Inf")
