"""The bad-input corpus: malformed copies of the real Visium sample, one per case of issue 13.

Nothing of the real data is kept in the repository: :func:`build_corpus` writes the malformed copies into a
folder given at run time (a pytest temporary folder, or any folder from the command line)::

    python tests/bad_inputs/corpus.py ../shared/data/visium_mouse_brain_raw_top100/outs /tmp/bad_inputs

Each :class:`Case` says how to run it through the command line (``argv`` of ``undiffuse``) and through the
library (``library``, a callable), which file the message must name, which words it must hold, and which
outputs must not exist afterwards. Every case is a user error: exit status 2, one line, no traceback, no
output left.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

POSITION_NAMES = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]

#: A place no one can write to, root included.
UNWRITABLE = Path("/proc/undiffuse-bad-inputs")


@dataclass
class Case:
    """One malformed input and what must happen with it.

    Attributes
    ----------
    name
        Identifier (test id).
    issue
        The case of issue 13 it covers: ``1`` ... ``12``, ``registration``, or ``held`` (the classic cases
        that already held).
    argv
        Arguments of ``undiffuse`` that must fail; None when there is no command for it.
    library
        Library call that must raise ``InputError`` or ``ConfigError``.
    culprit
        What the message must name (a path, or an option); None for none.
    phrase
        Words the message must hold.
    outputs
        Paths that must not exist afterwards.
    """

    name: str
    issue: str
    argv: list[str] | None
    library: Callable[[], object]
    culprit: str | None
    phrase: str
    outputs: list[Path] = field(default_factory=list)


def _writable_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return target


def _positions_file(outs: Path) -> Path:
    return next((outs / "spatial").glob("tissue_positions*"))


def _edit_positions(outs: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    path = _positions_file(outs)
    header = path.read_text().split(",", 1)[0].strip().lower() == "barcode"
    table = pd.read_csv(path, header=0 if header else None, dtype=str, keep_default_na=False)
    table.columns = POSITION_NAMES
    edit(table).to_csv(path, index=False, header=header)
    return path


def _edit_h5(path: Path, edit: Callable[[h5py.Group], None]) -> Path:
    with h5py.File(path, "r+") as handle:
        edit(handle["matrix"])
    return path


def _replace(group: h5py.Group, name: str, values: np.ndarray) -> None:
    del group[name]
    group.create_dataset(name, data=values)


class Corpus:
    """Builds the cases into ``root`` from the sample's ``outs/`` and its ``prepared.h5ad``."""

    def __init__(self, outs: Path, prepared: Path, root: Path) -> None:
        self.outs = Path(outs)
        self.prepared = Path(prepared)
        self.root = Path(root)

    # --- helpers -------------------------------------------------------------------------------------------

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    def sample(self, name: str) -> tuple[Path, Path]:
        """A writable copy of ``outs/`` and the output folder of ``prepare``."""
        folder = self.folder(name)
        return _writable_copy(self.outs, folder / "sample" / "outs"), folder / "results"

    def prepared_copy(self, name: str, edit: Callable | None = None) -> tuple[Path, Path]:
        """A copy of ``prepared.h5ad`` (edited in memory by ``edit``) and the output of ``correct``."""
        import anndata as ad

        folder = self.folder(name)
        target = folder / "prepared.h5ad"
        if edit is None:
            shutil.copyfile(self.prepared, target)
        else:
            adata = ad.read_h5ad(self.prepared)
            edit(adata)
            adata.write_h5ad(target)
        return target, folder / "corrected.h5ad"

    @staticmethod
    def prepare_case(name, issue, source, outdir, culprit, phrase, *extra, **kwargs) -> Case:
        from undiffuse.prepare import prepare_sample

        return Case(
            name=name,
            issue=issue,
            argv=["prepare", str(source), str(outdir), *extra],
            library=lambda: prepare_sample(source, outdir, **kwargs),
            culprit=None if culprit is None else str(culprit),
            phrase=phrase,
            outputs=[Path(outdir)],
        )

    def correct_case(self, name, issue, prepared, output, culprit, phrase, *extra, library=None) -> Case:
        from undiffuse.io.h5ad import read_prepared

        return Case(
            name=name,
            issue=issue,
            argv=["correct", str(prepared), str(output), "--quiet", *extra],
            library=library or (lambda: read_prepared(prepared)),
            culprit=None if culprit is None else str(culprit),
            phrase=phrase,
            outputs=[Path(output)],
        )

    # --- the cases -------------------------------------------------------------------------------------------

    def held_missing_input(self) -> Case:
        folder = self.folder("held_missing_input")
        missing = folder / "no_such_sample"
        return self.prepare_case(
            "held_missing_input", "held", missing, folder / "results", missing, "does not exist"
        )

    def held_truncated_h5(self) -> Case:
        outs, results = self.sample("held_truncated_h5")
        h5 = outs / "raw_feature_bc_matrix.h5"
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
        return self.prepare_case("held_truncated_h5", "held", outs, results, h5, "truncated")

    def held_not_hdf5(self) -> Case:
        outs, results = self.sample("held_not_hdf5")
        h5 = outs / "raw_feature_bc_matrix.h5"
        h5.write_bytes(b"not an HDF5 file\n" * 100)
        return self.prepare_case("held_not_hdf5", "held", outs, results, h5, "cannot be read as HDF5")

    def held_barcodes_absent(self) -> Case:
        outs, results = self.sample("held_barcodes_absent")
        _edit_positions(outs, lambda table: table.iloc[5:])
        h5 = outs / "raw_feature_bc_matrix.h5"
        return self.prepare_case("held_barcodes_absent", "held", outs, results, h5, "absent from")

    def held_no_tissue(self) -> Case:
        outs, results = self.sample("held_no_tissue")
        path = _edit_positions(outs, lambda table: table.assign(in_tissue="0"))
        return self.prepare_case("held_no_tissue", "held", outs, results, path, "no spot is marked in tissue")

    def held_filtered_only(self) -> Case:
        import scipy.io
        import scipy.sparse as sp

        from undiffuse.io.matrix import read_10x_h5

        outs, results = self.sample("held_filtered_only")
        matrix = read_10x_h5(outs / "raw_feature_bc_matrix.h5")
        positions = pd.read_csv(_positions_file(outs), header=None, names=POSITION_NAMES, dtype=str)
        tissue = set(positions.loc[positions["in_tissue"] == "1", "barcode"])
        keep = np.flatnonzero(matrix.barcodes.isin(tissue))
        filtered = outs / "filtered_feature_bc_matrix"
        filtered.mkdir()
        scipy.io.mmwrite(filtered / "matrix.mtx", sp.csr_matrix(matrix.counts[keep].T, dtype=np.int64))
        pd.Series(matrix.barcodes[keep]).to_csv(filtered / "barcodes.tsv", index=False, header=False)
        matrix.features[["gene_ids", "gene_names", "feature_types"]].to_csv(
            filtered / "features.tsv", sep="\t", index=False, header=False
        )
        (outs / "raw_feature_bc_matrix.h5").unlink()
        return self.prepare_case("held_filtered_only", "held", outs, results, outs, "--allow-filtered")

    def held_bad_coordinates(self) -> Case:
        outs, results = self.sample("held_bad_coordinates")

        def edit(table: pd.DataFrame) -> pd.DataFrame:
            table.loc[3, "pxl_row_in_fullres"] = "abc"
            return table

        path = _edit_positions(outs, edit)
        return self.prepare_case(
            "held_bad_coordinates", "held", outs, results, path, "non-numeric value 'abc'"
        )

    def held_corrupt_image(self) -> Case:
        outs, results = self.sample("held_corrupt_image")
        image = outs / "spatial" / "tissue_lowres_image.png"
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 1000)
        return self.prepare_case(
            "held_corrupt_image", "held", outs, results, image, "cannot be read as an image"
        )

    # 1. silent data loss

    def _prepared_value(self, name: str, value: float, phrase: str) -> Case:
        def edit(adata) -> None:
            adata.X = adata.X.tocsr().astype(np.float32)
            adata.X.data[10] = value

        prepared, output = self.prepared_copy(name, edit)
        return self.correct_case(name, "1", prepared, output, prepared, phrase)

    def prepared_h5ad_with_nan(self) -> Case:
        return self._prepared_value("prepared_h5ad_with_nan", np.nan, "1 NaN or infinite value(s)")

    def prepared_h5ad_with_inf(self) -> Case:
        return self._prepared_value("prepared_h5ad_with_inf", np.inf, "1 NaN or infinite value(s)")

    def prepared_h5ad_with_negative(self) -> Case:
        return self._prepared_value("prepared_h5ad_with_negative", -3.0, "1 negative value(s)")

    def prepared_h5ad_nan_in_memory(self) -> Case:
        """``correct()``'s own check (:func:`undiffuse.validate.check_correct_input`) on the AnnData."""
        import anndata as ad

        from undiffuse.validate import check_correct_input

        prepared, output = self.prepared_copy("prepared_h5ad_nan_in_memory")

        def library() -> None:
            adata = ad.read_h5ad(prepared)
            adata.X = adata.X.tocsr().astype(np.float32)
            adata.X.data[10] = np.nan
            adata.uns["undiffuse"]["source"] = str(prepared)
            check_correct_input(adata)

        case = self.correct_case(
            "prepared_h5ad_nan_in_memory", "1", prepared, output, prepared, "NaN", library=library
        )
        case.argv = None
        return case

    def scanpy_h5ad_with_nan(self) -> Case:
        from undiffuse.io import read_sample

        folder = self.folder("scanpy_h5ad_with_nan")
        adata = read_sample(self.outs)
        adata.X = adata.X.tocsr()
        adata.X.data[0] = np.nan
        path = folder / "sample.h5ad"
        adata.write_h5ad(path)
        return self.prepare_case(
            "scanpy_h5ad_with_nan", "1", path, folder / "results", path, "NaN or infinite"
        )

    # 2. duplicate barcodes

    def duplicate_barcodes_in_h5(self) -> Case:
        outs, results = self.sample("duplicate_barcodes_in_h5")
        h5 = outs / "raw_feature_bc_matrix.h5"

        def edit(group: h5py.Group) -> None:
            barcodes = group["barcodes"][:]
            barcodes[1] = barcodes[0]
            group["barcodes"][:] = barcodes

        _edit_h5(h5, edit)
        return self.prepare_case(
            "duplicate_barcodes_in_h5", "2", outs, results, h5, "barcode(s) more than once"
        )

    # 3. non-integer counts

    def non_integer_counts_in_h5(self) -> Case:
        outs, results = self.sample("non_integer_counts_in_h5")
        h5 = outs / "raw_feature_bc_matrix.h5"

        def edit(group: h5py.Group) -> None:
            data = group["data"][:].astype(np.float32)
            data[5] += 0.5
            _replace(group, "data", data)

        _edit_h5(h5, edit)
        return self.prepare_case("non_integer_counts_in_h5", "3", outs, results, h5, "1 non-integer value(s)")

    # 4. degenerate tissue

    def _few_tissue_spots(self, name: str, keep: int) -> Case:
        outs, results = self.sample(name)

        def edit(table: pd.DataFrame) -> pd.DataFrame:
            tissue = np.flatnonzero(table["in_tissue"].to_numpy() == "1")
            table["in_tissue"] = "0"
            table.loc[tissue[:keep], "in_tissue"] = "1"
            return table

        path = _edit_positions(outs, edit)
        return self.prepare_case(name, "4", outs, results, path, f"degenerate tissue: only {keep} of 4992")

    def one_tissue_spot(self) -> Case:
        return self._few_tissue_spots("one_tissue_spot", 1)

    def ten_tissue_spots(self) -> Case:
        return self._few_tissue_spots("ten_tissue_spots", 10)

    def prepared_degenerate_tissue(self) -> Case:
        def edit(adata) -> None:
            tissue = np.zeros(adata.n_obs, dtype=bool)
            tissue[np.flatnonzero(adata.obs["tissue"].to_numpy())[:10]] = True
            adata.obs["tissue"] = tissue

        prepared, output = self.prepared_copy("prepared_degenerate_tissue", edit)
        return self.correct_case(
            "prepared_degenerate_tissue", "4", prepared, output, prepared, "--allow-degenerate-tissue"
        )

    # 5. config files

    def _config(self, name: str, text: str | bytes, phrase: str) -> Case:
        from undiffuse.config import load_config

        prepared, output = self.prepared_copy(name)
        config = prepared.parent / "config.yaml"
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        case = self.correct_case(
            name,
            "5",
            prepared,
            output,
            config,
            phrase,
            "--config",
            str(config),
            library=lambda: load_config(config),
        )
        return case

    def config_epochs_not_integer(self) -> Case:
        return self._config(
            "config_epochs_not_integer", "correct:\n  epochs: 2.5\n", "is not of type 'integer'"
        )

    def config_weights_scalar(self) -> Case:
        return self._config("config_weights_scalar", "correct:\n  weights: 5\n", "is not of type 'object'")

    def config_yaml_syntax_error(self) -> Case:
        return self._config("config_yaml_syntax_error", "correct:\n  epochs: [3\n", "is not valid YAML")

    # 6. output paths, checked before the work

    def output_read_only(self) -> Case:
        from undiffuse.atomic import check_output_path

        prepared, _ = self.prepared_copy("output_read_only")
        output = UNWRITABLE / "corrected.h5ad"
        return self.correct_case(
            "output_read_only",
            "6",
            prepared,
            output,
            output,
            "cannot be written",
            library=lambda: check_output_path(output),
        )

    def output_parent_is_file(self) -> Case:
        from undiffuse.atomic import check_output_path

        prepared, _ = self.prepared_copy("output_parent_is_file")
        parent = prepared.parent / "a_file"
        parent.write_text("not a folder\n")
        output = parent / "corrected.h5ad"
        return self.correct_case(
            "output_parent_is_file",
            "6",
            prepared,
            output,
            output,
            "is a file, not a folder",
            library=lambda: check_output_path(output),
        )

    def output_is_folder(self) -> Case:
        from undiffuse.atomic import check_output_path

        prepared, output = self.prepared_copy("output_is_folder")
        output.mkdir()
        case = self.correct_case(
            "output_is_folder",
            "6",
            prepared,
            output,
            output,
            "is a folder; give a file name",
            library=lambda: check_output_path(output),
        )
        case.outputs = []  # the folder was there before and stays
        return case

    def prepare_outdir_is_file(self) -> Case:
        outs, results = self.sample("prepare_outdir_is_file")
        results.write_text("not a folder\n")
        case = self.prepare_case("prepare_outdir_is_file", "6", outs, results, results, "folder is a file")
        case.outputs = []
        return case

    def prepare_outdir_read_only(self) -> Case:
        outs, _ = self.sample("prepare_outdir_read_only")
        results = UNWRITABLE / "results"
        return self.prepare_case("prepare_outdir_read_only", "6", outs, results, results, "cannot be written")

    # 8. errors name the right file

    def gene_file_names_itself(self) -> Case:
        from undiffuse.genes import resolve_genes
        from undiffuse.io.h5ad import read_prepared

        prepared, output = self.prepared_copy("gene_file_names_itself")
        genes = prepared.parent / "genes.txt"
        genes.write_text("Mbp\nNotAGene1\n")
        return self.correct_case(
            "gene_file_names_itself",
            "8",
            prepared,
            output,
            genes,
            "1 gene(s) are not in the matrix: NotAGene1",
            "--genes-file",
            str(genes),
            library=lambda: resolve_genes(read_prepared(prepared), genes),
        )

    # 9. tracebacks instead of errors

    def gene_repeated_in_genes_option(self) -> Case:
        from undiffuse.genes import resolve_genes
        from undiffuse.io.h5ad import read_prepared

        prepared, output = self.prepared_copy("gene_repeated_in_genes_option")
        return self.correct_case(
            "gene_repeated_in_genes_option",
            "9",
            prepared,
            output,
            "--genes",
            "names Mbp more than once",
            "--genes",
            "Mbp",
            "Plp1",
            "Mbp",
            library=lambda: resolve_genes(read_prepared(prepared), ["Mbp", "Plp1", "Mbp"], option="--genes"),
        )

    def n_top_genes_zero(self) -> Case:
        outs, results = self.sample("n_top_genes_zero")
        return self.prepare_case(
            "n_top_genes_zero",
            "9",
            outs,
            results,
            "--n-top-genes",
            "must be at least 1",
            "--n-top-genes",
            "0",
            n_top_genes=0,
        )

    def min_counts_negative(self) -> Case:
        outs, results = self.sample("min_counts_negative")
        return self.prepare_case(
            "min_counts_negative",
            "9",
            outs,
            results,
            "--min-counts",
            "must be at least 0",
            "--min-counts",
            "-1",
            min_counts=-1,
        )

    def genes_file_undecodable(self) -> Case:
        from undiffuse.genes import read_gene_list

        prepared, output = self.prepared_copy("genes_file_undecodable")
        genes = prepared.parent / "genes.txt"
        genes.write_bytes(b"Mbp\n\xff\xfe\x00P\x00l\x00p\x001\x00\n")
        return self.correct_case(
            "genes_file_undecodable",
            "9",
            prepared,
            output,
            genes,
            "is not UTF-8 text",
            "--genes-file",
            str(genes),
            library=lambda: read_gene_list(genes),
        )

    # 10. one parser per gene list: comments are comments for prepare and correct alike

    def gene_list_comment_prepare(self) -> Case:
        outs, results = self.sample("gene_list_comment_prepare")
        genes = outs.parent / "genes.txt"
        genes.write_text("# my markers\nMbp  # myelin\nNotAGene2\n")
        return self.prepare_case(
            "gene_list_comment_prepare",
            "10",
            outs,
            results,
            genes,
            "1 gene(s) are not in the matrix: NotAGene2;",
            "--genes",
            str(genes),
            genes=genes,
        )

    def gene_list_comment_correct(self) -> Case:
        from undiffuse.genes import resolve_genes
        from undiffuse.io.h5ad import read_prepared

        prepared, output = self.prepared_copy("gene_list_comment_correct")
        genes = prepared.parent / "genes.txt"
        genes.write_text("# my markers\nMbp  # myelin\nNotAGene2\n")
        return self.correct_case(
            "gene_list_comment_correct",
            "10",
            prepared,
            output,
            genes,
            "1 gene(s) are not in the matrix: NotAGene2;",
            "--genes-file",
            str(genes),
            library=lambda: resolve_genes(read_prepared(prepared), genes),
        )

    # 11. empty data

    def zero_genes(self) -> Case:
        outs, results = self.sample("zero_genes")
        h5 = outs / "raw_feature_bc_matrix.h5"

        def edit(group: h5py.Group) -> None:
            for name in ("id", "name", "feature_type", "genome"):
                _replace(group["features"], name, np.array([], dtype="S8"))
            _replace(group, "data", np.array([], dtype=np.int32))
            _replace(group, "indices", np.array([], dtype=np.int64))
            _replace(group, "indptr", np.zeros(group["indptr"].shape[0], dtype=np.int64))
            group["shape"][0] = 0

        _edit_h5(h5, edit)
        return self.prepare_case("zero_genes", "11", outs, results, h5, "holds no gene")

    def all_zero_matrix(self) -> Case:
        outs, results = self.sample("all_zero_matrix")
        h5 = outs / "raw_feature_bc_matrix.h5"
        _edit_h5(h5, lambda group: group["data"].__setitem__(slice(None), 0))
        return self.prepare_case("all_zero_matrix", "11", outs, results, outs, "every count in X is zero")

    # 12. sample sheets and validation messages name their file

    def sample_sheet_without_sample_column(self) -> Case:
        from undiffuse.config import read_sample_sheet

        folder = self.folder("sample_sheet_without_sample_column")
        sheet = folder / "samples.tsv"
        sheet.write_text(f"name\tinput\nbrain\t{self.outs}\n")
        return Case(
            name="sample_sheet_without_sample_column",
            issue="12",
            argv=None,
            library=lambda: read_sample_sheet(sheet),
            culprit=str(sheet),
            phrase="lacks the column(s) sample",
        )

    # mis-registration of positions, scale factors and image

    def swapped_axes(self) -> Case:
        outs, results = self.sample("swapped_axes")

        def edit(table: pd.DataFrame) -> pd.DataFrame:
            table[["pxl_row_in_fullres", "pxl_col_in_fullres"]] = table[
                ["pxl_col_in_fullres", "pxl_row_in_fullres"]
            ].to_numpy()
            return table

        path = _edit_positions(outs, edit)
        return self.prepare_case("swapped_axes", "registration", outs, results, path, "look swapped")

    def scalefactors_of_another_resolution(self) -> Case:
        outs, results = self.sample("scalefactors_of_another_resolution")
        path = outs / "spatial" / "scalefactors_json.json"
        values = json.loads(path.read_text())
        values["spot_diameter_fullres"] *= 8
        path.write_text(json.dumps(values))
        return self.prepare_case(
            "scalefactors_of_another_resolution", "registration", outs, results, path, "spot_diameter_fullres"
        )

    def image_at_another_scale(self) -> Case:
        from PIL import Image

        outs, results = self.sample("image_at_another_scale")
        path = outs / "spatial" / "tissue_lowres_image.png"
        with Image.open(path) as image:
            image.resize((image.width // 2, image.height // 2)).save(path)
        return self.prepare_case(
            "image_at_another_scale", "registration", outs, results, path, "does not fit"
        )


#: Every case, in the order of the issue.
CASE_BUILDERS = [
    name
    for name in vars(Corpus)
    if not name.startswith("_")
    and name not in {"folder", "sample", "prepared_copy", "prepare_case", "correct_case"}
]


def build_corpus(outs: str | Path, prepared: str | Path, root: str | Path) -> list[Case]:
    """Write every case into ``root`` (which must not hold them yet) and return them."""
    corpus = Corpus(Path(outs), Path(prepared), Path(root))
    return [getattr(corpus, name)() for name in CASE_BUILDERS]


def main(argv: list[str] | None = None) -> int:
    """``python tests/bad_inputs/corpus.py OUTS ROOT``: prepare the sample, then write the corpus into ROOT."""
    import argparse

    from undiffuse.prepare import prepare_sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outs", type=Path, help="the real sample's outs/ folder")
    parser.add_argument("root", type=Path, help="folder to write the corpus into")
    args = parser.parse_args(argv)
    prepare_sample(args.outs, args.root / "_prepared")
    cases = build_corpus(args.outs, args.root / "_prepared" / "prepared.h5ad", args.root)
    for case in cases:
        command = "(library only)" if case.argv is None else "undiffuse " + " ".join(case.argv)
        print(f"[{case.issue}] {case.name}: {command}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
