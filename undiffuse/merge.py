"""Merge the chunk outputs of a sample into ``corrected.h5ad`` and ``parameters.tsv``.

Each chunk holds the corrected values and learned parameters of its genes (:func:`undiffuse.chunks.write_chunk`).
The merge assigns them into the prepared sample in :func:`undiffuse.correct`'s layout: ``X`` keeps the raw
counts of every gene, ``layers['corrected']`` holds the corrected genes' values and the others' raw counts.
Because the correction treats every gene on its own, the merge of any chunking equals one direct
``undiffuse.correct`` call on the prepared sample.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .atomic import atomic_path
from .chunks import read_chunk
from .correct import (
    CORRECTED_COLUMN,
    KEY,
    PARAMETER_COLUMNS,
    parameter_column,
    parameter_table,
    store_correction,
)
from .errors import InputError
from .io.h5ad import read_prepared
from .moran import morans_i_numpy, spatial_weights
from .quantiles import read_quantile_table

#: Settings a chunk may resolve on its own (the rank and updates chosen from its genes' counts).
PER_CHUNK_SETTINGS = ("programmes", "programme_updates", "programmes_held_out_deviance")
#: Settings that list some of a chunk's genes: the merged sample lists those of all chunks.
GENE_LIST_SETTINGS = ("programmes_own_field_genes",)
#: ``var`` columns of Moran's I (all spots, first ring) of the raw counts and of the corrected layer.
MORAN_RAW, MORAN_CORRECTED = f"{KEY}_moran_raw", f"{KEY}_moran_corrected"

#: ``var`` column of Moran's I of the counts thresholded at ``q_init`` (the quantile scan's).
MORAN_AT_Q_INIT = f"{KEY}_moran_at_q_init"

#: Columns of ``parameters.tsv`` after ``gene``: learned parameters, Moran's I before and after, pass-through.
PARAMETER_TABLE_COLUMNS = (*PARAMETER_COLUMNS, "moran_before", "moran_after", "passed_through")


def merge_chunks(prepared: AnnData, chunks: Sequence[AnnData], *, quantiles: pd.DataFrame) -> None:
    """Assign the corrected genes of the chunks into the prepared sample, in place.

    Parameters
    ----------
    prepared
        ``(N, G)`` prepared sample: raw counts of all genes on all spots.
    chunks
        Chunk AnnDatas (:func:`undiffuse.chunks.read_chunk`) on the same spots in the same order, with disjoint
        genes.
    quantiles
        ``quantiles.tsv`` (:func:`undiffuse.quantiles.read_quantile_table`): the chunks' genes and the scan's
        Moran's I, which is read here rather than computed again.

    Notes
    -----
    ``prepared`` gains what :func:`undiffuse.correct` writes (``layers['corrected']``, the ``undiffuse_*``
    columns of ``var`` and ``varm['undiffuse_phi']``, ``uns['undiffuse']['correction']``, whose
    ``loss_history`` and ``kernel_profile`` hold all chunks with a ``chunk`` column), and per gene
    ``var['undiffuse_moran_raw']`` (the scan's for the scanned genes), ``['undiffuse_moran_at_q_init']`` (0 for
    the others) and ``['undiffuse_moran_corrected']``: Moran's I of the corrected layer, computed here once;
    genes the scan did not see are not changed, so their raw I is that one.
    """
    position = pd.Series(np.arange(prepared.n_vars), index=prepared.var_names)
    seen = np.zeros(prepared.n_vars, dtype=bool)
    values, params = [], []
    for number, chunk in enumerate(chunks):
        if not chunk.obs_names.equals(prepared.obs_names):
            raise ValueError(f"chunk {number} does not hold the prepared spots in the prepared order")
        unknown = chunk.var_names.difference(prepared.var_names)
        if len(unknown):
            raise ValueError(f"chunk {number} has genes that the prepared sample lacks: {list(unknown[:5])}")
        where = position[chunk.var_names].to_numpy()
        if seen[where].any():
            raise ValueError(f"chunk {number} repeats genes of an earlier chunk")
        seen[where] = True
        values.append(sp.csc_matrix(chunk.X, dtype=np.float32))
        try:
            params.append(parameter_table(chunk))
        except KeyError as err:
            raise ValueError(f"chunk {number} lacks the learned parameter {err}") from err
    empty = pd.DataFrame(columns=[*PARAMETER_COLUMNS, "corrected"]).astype({"corrected": bool})
    table = pd.concat(params) if params else empty
    corrected = (
        sp.hstack(values, format="csc") if values else sp.csc_matrix((prepared.n_obs, 0), dtype=np.float32)
    )
    _require_finite(corrected, "corrected values")
    store_correction(
        prepared,
        corrected=corrected,
        params=table,
        provenance=_merged_provenance(chunks),
        counts=prepared.X,
        key_added="corrected",
    )
    after = morans_i_numpy(prepared.layers["corrected"], spatial_weights(prepared))
    scanned = prepared.var_names.get_indexer(quantiles.index)
    if (scanned < 0).any():
        raise ValueError(
            f"quantile table genes not in the prepared sample: {list(quantiles.index[scanned < 0][:5])}"
        )
    before = after.copy()
    before[scanned] = quantiles["moran_raw"].to_numpy(np.float64)
    at_q_init = np.zeros(prepared.n_vars)
    at_q_init[scanned] = quantiles["moran_at_q_init"].to_numpy(np.float64)
    prepared.var[MORAN_RAW] = before
    prepared.var[MORAN_AT_Q_INIT] = at_q_init
    prepared.var[MORAN_CORRECTED] = after


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
    table = read_quantile_table(quantiles)
    # prepare has judged the tissue (and its override); the counts are checked again here.
    merged = read_prepared(prepared, allow_degenerate_tissue=True)
    chunk_adatas = [read_chunk(path) for path in chunks]
    covered = [gene for chunk in chunk_adatas for gene in chunk.var_names]
    if sorted(covered) != sorted(table.index):
        missing = sorted(set(table.index) - set(covered))
        extra = sorted(set(covered) - set(table.index))
        raise InputError(
            quantiles,
            f"the {len(chunks)} chunks do not cover its genes: missing {missing[:5]}, unexpected {extra[:5]}",
        )
    try:
        merge_chunks(merged, chunk_adatas, quantiles=table)
    except ValueError as err:
        raise InputError(Path(chunks[0]).parent if chunks else prepared, str(err)) from err
    merged.uns[KEY] = {
        **dict(merged.uns.get(KEY, {})),
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


def parameters_tsv_table(merged: AnnData) -> pd.DataFrame:
    """The per-gene table of ``parameters.tsv``: gene, learned parameters, Moran's I, pass-through flag."""
    var = merged.var
    table = pd.DataFrame({name: var[parameter_column(name)] for name in PARAMETER_COLUMNS})
    table["moran_before"] = var[MORAN_RAW]
    table["moran_after"] = var[MORAN_CORRECTED]
    table["passed_through"] = ~var[CORRECTED_COLUMN].to_numpy(bool)
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
    table = parameters_tsv_table(merged)
    with atomic_path(output) as tmp:
        merged.write_h5ad(tmp, compression="gzip")
    with atomic_path(parameters) as tmp:
        # The learned parameters are float32: seven significant digits are all they hold.
        table.to_csv(tmp, sep="\t", index=False, float_format="%.7g")


def _merged_provenance(chunks: Sequence[AnnData]) -> dict[str, Any]:
    """The chunks' correction provenance as one: the first chunk's settings (the same in every chunk, except
    the rank of the low-rank model where each chunk chose its own: then each chunk's, in chunk order), and the
    loss histories and kernel profiles of all chunks, each with a ``chunk`` column."""
    if not chunks:
        return {"layer": "corrected", "counts": "X", "config": {}}
    merged = dict(chunks[0].uns[KEY]["correction"])
    merged["config"] = dict(merged["config"])
    for key in PER_CHUNK_SETTINGS:
        values = [str(chunk.uns[KEY]["correction"]["config"].get(key, "none")) for chunk in chunks]
        if len(set(values)) > 1:
            merged["config"][key] = "; ".join(
                f"chunk {int(chunk.uns[KEY]['chunk']['index'])}: {value}"
                for chunk, value in zip(chunks, values, strict=True)
            )
    for key in GENE_LIST_SETTINGS:
        listed = [str(chunk.uns[KEY]["correction"]["config"].get(key, "none")) for chunk in chunks]
        merged["config"][key] = ", ".join(value for value in listed if value != "none") or "none"
    for key in ("loss_history", "kernel_profile"):
        merged[key] = pd.concat(
            [
                pd.DataFrame(chunk.uns[KEY]["correction"][key]).assign(
                    chunk=int(chunk.uns[KEY]["chunk"]["index"])
                )
                for chunk in chunks
            ],
            ignore_index=True,
        )
    return merged


def _require_finite(values: np.ndarray | sp.spmatrix | sp.sparray, what: str) -> None:
    data = values.data if sp.issparse(values) else np.asarray(values)
    if not np.isfinite(data).all():
        raise ValueError(f"{what} hold NaN or Inf")
