"""Shared set-up of the workflow: config and sample-sheet validation, paths, input functions, resources."""

import os
import re
from pathlib import Path

import pandas as pd

# The workflow imports the undiffuse package installed in the environment that runs snakemake
# (`pip install -e ".[workflow]"`, or `make setup`), and its jobs the one installed in theirs: envs/*.yaml
# install this checkout with `pip install -e ${UNDIFFUSE_ROOT}`, declared so that snakemake hands it on to
# remote jobs.
os.environ["UNDIFFUSE_ROOT"] = str(Path(workflow.basedir).resolve())


envvars:
    "UNDIFFUSE_ROOT",


try:
    import undiffuse.package_data
except ImportError as err:
    raise ImportError(
        f"the environment running snakemake has no undiffuse package ({err}): "
        f'install it with `pip install -e "{workflow.basedir}[workflow]"` (or `make setup` in the checkout)'
    ) from None
from undiffuse.chunks import n_chunks
from undiffuse.config import (
    DEFAULT_BIN_SIZE_UM,
    SIMULATED_HD_INPUT,
    SIMULATED_INPUT,
    correction_options,
    hd_bin_folder,
    read_sample_sheet,
    simulation_hd_options,
    simulation_options,
    validate_config,
)
from undiffuse.errors import InputError
from undiffuse.io.visium_hd import folder_bin_size
from undiffuse.quantiles import quantile_genes

# The package's one config validator, so that errors name the config file(s) as they do from the CLI.
CONFIG_FILES = list(dict.fromkeys(str(Path(f).resolve()) for f in workflow.configfiles))
config.update(validate_config(config, source=", ".join(CONFIG_FILES) or None))


def resolve_path(path):
    """A path from the config or the sample sheet: as given when it exists from the working directory,
    else relative to the workflow's folder (so that --directory runs still find config/...).
    """
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    beside_workflow = Path(workflow.basedir) / candidate
    return beside_workflow if beside_workflow.exists() else candidate


SAMPLE_SHEET = resolve_path(config["samples"])
if not SAMPLE_SHEET.is_file():
    raise InputError(SAMPLE_SHEET, "sample sheet not found (config key 'samples')")
# The one parser of sample sheets (undiffuse.config.read_sample_sheet): schema, required columns, unique
# names; its errors name the sheet.
samples = read_sample_sheet(SAMPLE_SHEET)

RESULTS = config["outdir"]
SAMPLES = list(samples.index)
RULE_RESOURCES = config["resources"]

#: Reports are optional: their rules live in rules/report.smk and are included when it exists.
REPORT_RULES = Path(workflow.basedir) / "rules" / "report.smk"


wildcard_constraints:
    sample="|".join(re.escape(sample) for sample in SAMPLES),
    chunk=r"\d+",


def canonical(options):
    """A params mapping with its keys sorted at every level: the order of keys in the config files must not
    look like a change of parameters to snakemake's params rerun trigger."""
    if isinstance(options, dict):
        return {key: canonical(options[key]) for key in sorted(options)}
    return options


# ---------------------------------------------------------------------------------------------------------
# Sample sheet


def sheet_value(sample, column):
    """A cell of the sample sheet, or None when the column is absent or the cell empty."""
    value = samples.loc[sample].get(column)
    return (
        None
        if value is None or pd.isna(value) or not str(value).strip()
        else str(value).strip()
    )


def is_simulated(sample):
    """Simulated by the workflow: a Visium (rule simulate) or a Visium HD sample (rule simulate_hd)."""
    return sheet_value(sample, "input") in (SIMULATED_INPUT, SIMULATED_HD_INPUT)


def is_simulated_hd(sample):
    return sheet_value(sample, "input") == SIMULATED_HD_INPUT


def sample_pattern(names):
    """A wildcard constraint matching exactly these samples (nothing when there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def bin_size(sample):
    """Bin size in microns of a Visium HD sample (the sheet's bin_size, 8 for simulate_hd rows by default);
    None for a sample without one (Visium, or an HD square folder named directly)."""
    value = sheet_value(sample, "bin_size")
    if value is not None:
        return int(value)
    return DEFAULT_BIN_SIZE_UM if is_simulated_hd(sample) else None


def simulated_dir(sample):
    return f"{RESULTS}/{sample}/simulated"


def simulated_square(sample):
    """The square_XXXum/ folder of a simulated HD sample that prepare reads."""
    return (
        f"{simulated_dir(sample)}/outs/binned_outputs/square_{bin_size(sample):03d}um"
    )


def input_location(sample):
    """What prepare reads: the simulated outs/ or square_XXXum/ folder, or the sheet's input path (for HD
    with a bin_size: its square_XXXum/ folder)."""
    if is_simulated_hd(sample):
        return simulated_square(sample)
    if is_simulated(sample):
        return f"{simulated_dir(sample)}/outs"
    return str(
        hd_bin_folder(resolve_path(sheet_value(sample, "input")), bin_size(sample))
    )


def optional_sheet_path(sample, column):
    value = sheet_value(sample, column)
    return None if value is None else str(resolve_path(value))


def hd_bin_size(sample):
    """Bin size in microns of a Visium HD sample (sheet bin_size, or a square_XXXum/ input); None otherwise."""
    size = bin_size(sample)
    if size is None and not is_simulated(sample):
        size = folder_bin_size(Path(sheet_value(sample, "input")))
    return size


def aggregate_targets(bin_sizes):
    """Every sample's aggregated files (rules aggregate_bins and aggregate_cells): each of ``bin_sizes`` that is a larger multiple of its bin size, and
    its cells when the sheet names a segmentation."""
    targets = []
    for sample in SAMPLES:
        size = hd_bin_size(sample)
        if sheet_value(sample, "cells") is not None:
            if size is None:
                raise InputError(
                    SAMPLE_SHEET,
                    f"sample {sample} has a cells segmentation but is not a Visium HD sample with a known "
                    "bin size; set its bin_size, or leave cells empty",
                )
            targets.append(f"{RESULTS}/{sample}/aggregated/cells.h5ad")
        if size is not None:
            targets += [
                f"{RESULTS}/{sample}/aggregated/square_{coarse:03d}um.h5ad"
                for coarse in bin_sizes
                if coarse > size and coarse % size == 0
            ]
    return targets


# ---------------------------------------------------------------------------------------------------------
# Input functions


def prepare_inputs(wildcards):
    """The files prepare depends on: the simulated matrix (which makes the DAG run simulate first), or the
    sheet's input, plus the optional image and gene list."""
    sample = wildcards.sample
    if is_simulated_hd(sample):
        inputs = {"data": f"{simulated_square(sample)}/raw_feature_bc_matrix.h5"}
    elif is_simulated(sample):
        inputs = {"data": f"{simulated_dir(sample)}/outs/raw_feature_bc_matrix.h5"}
    else:
        inputs = {"data": input_location(sample)}
    for column in ("image", "genes"):
        path = optional_sheet_path(sample, column)
        if path is not None:
            inputs[column] = path
    return inputs


def truth_file(wildcards):
    """The simulated ground truth of a sample (of its bin size for HD), or nothing for a real sample (for
    report rules)."""
    sample = wildcards.sample
    if is_simulated_hd(sample):
        return f"{simulated_dir(sample)}/truth/square_{bin_size(sample):03d}um.h5ad"
    if is_simulated(sample):
        return f"{simulated_dir(wildcards.sample)}/truth.h5ad"
    return []


#: Marker table of the report's cell-type maps when the config's report.markers is not set (simulated samples).
SIMULATED_MARKERS = str(undiffuse.package_data.SIMULATED_MARKERS)


def report_markers(sample):
    """Marker table of a sample's cell-type maps: report.markers of the config when set; otherwise the
    simulator's domains for a simulated Visium sample, the cell types rule simulate_hd wrote for a simulated
    Visium HD one, and none for a real one."""
    configured = config["report"].get("markers")
    if configured:
        return str(resolve_path(configured))
    if is_simulated_hd(sample):
        return f"{simulated_dir(sample)}/markers.tsv"
    return SIMULATED_MARKERS if is_simulated(sample) else []


def simulated_reference(sample):
    """The reference.h5ad rule simulate or simulate_hd writes for a simulated sample, else None."""
    return f"{simulated_dir(sample)}/reference.h5ad" if is_simulated(sample) else None


def reference_file(sample):
    """The reference .h5ad of a sample: the config's correct.reference with {sample} replaced (the
    simulator's own reference.h5ad when that is what it names), or None."""
    template = config["correct"].get("reference")
    if not template:
        return None
    path = template.replace("{sample}", sample)
    simulated = simulated_reference(sample)
    if simulated is not None and Path(path) == Path(simulated):
        return simulated
    return str(resolve_path(path))


def reference_profiles_input(wildcards):
    """The cell-type profiles a sample's chunks use (rule reference_profiles), or nothing."""
    if reference_file(wildcards.sample) is None:
        return []
    return f"{RESULTS}/{wildcards.sample}/reference_profiles.tsv"


# A reference the workflow does not write must exist before any job starts.
for _sample in SAMPLES:
    _reference = reference_file(_sample)
    if (
        _reference is not None
        and _reference != simulated_reference(_sample)
        and not Path(_reference).is_file()
    ):
        raise InputError(
            _reference,
            f"reference of sample {_sample} not found (config correct.reference); give an .h5ad of single "
            "cells with a cell-type column, or set correct.reference to null",
        )


def simulation_params(wildcards):
    sample = wildcards.sample
    options_of = (
        simulation_hd_options if is_simulated_hd(sample) else simulation_options
    )
    options = options_of(config, sample_id=sample, seed=sheet_value(sample, "seed"))
    return canonical(options)


def sample_chunk_count(sample):
    """Number of correct_chunk jobs of a sample, known once the checkpoint init_quantiles has run."""
    quantiles = checkpoints.init_quantiles.get(sample=sample).output.quantiles
    return n_chunks(len(quantile_genes(quantiles)), config["correct"]["chunk_size"])


def chunk_outputs(wildcards):
    return expand(
        f"{RESULTS}/{{sample}}/chunks/chunk_{{chunk}}.h5ad",
        sample=wildcards.sample,
        chunk=range(sample_chunk_count(wildcards.sample)),
    )


def step_benchmarks(wildcards):
    """Benchmark files of the steps before merge (named inputs benchmark_<step>), for the provenance."""
    sample = wildcards.sample
    simulate = "simulate_hd" if is_simulated_hd(sample) else "simulate"
    steps = ([simulate] if is_simulated(sample) else []) + [
        "prepare",
        "init_quantiles",
    ]
    files = {
        f"benchmark_{step}": f"logs/benchmarks/{sample}/{step}.tsv" for step in steps
    }
    for chunk in range(sample_chunk_count(sample)):
        files[f"benchmark_correct_chunk_{chunk}"] = (
            f"logs/benchmarks/{sample}/correct_chunk/{chunk}.tsv"
        )
    return files


# ---------------------------------------------------------------------------------------------------------
# Resources: attempt k of a job asks for k times the memory and run time of the first, so --retries escalates.


def rule_threads(rule):
    return RULE_RESOURCES[rule]["threads"]


def scaled_mem_mb(rule):
    return lambda wildcards, attempt: RULE_RESOURCES[rule]["mem_mb"] * attempt


def scaled_runtime(rule):
    return lambda wildcards, attempt: RULE_RESOURCES[rule]["runtime"] * attempt


def per_spot_gene_request(rule, resource, spot_genes, attempt):
    """A rule's mem_mb or runtime for a job holding spot_genes spot x gene values: the fixed part plus the part
    per million spot x gene (<resource>_per_million_spot_genes), times the attempt."""
    settings = RULE_RESOURCES[rule]
    per_million = settings[f"{resource}_per_million_spot_genes"]
    return int(attempt * (settings[resource] + per_million * spot_genes / 1e6))


#: Spots assumed before prepared.h5ad exists (a full Visium slide).
VISIUM_SPOTS = 4992


def count_spots(prepared):
    """Number of spots in prepared.h5ad (or corrected.h5ad), read from its obs index without loading the
    data."""
    try:
        import h5py

        with h5py.File(prepared, "r") as handle:
            obs = handle["obs"]
            return int(obs[obs.attrs["_index"]].shape[0])
    except (ImportError, OSError, KeyError):
        return VISIUM_SPOTS


#: Neighbours per spot within a radius of R pitches on the hexagonal Visium lattice: (2 pi / sqrt 3) R^2.
HEX_NEIGHBOURS_PER_SQUARED_PITCH = 3.63
#: Memory of one (neighbour pair x gene) of the pair operator, relative to one (spot x gene) on the lattice.
PAIR_GENE_SHARE = 0.1


#: Memory of a spot x gene of the final EM on the whole sample, relative to one of the kernel training:
#: the EM keeps no autograd graph, a few arrays per gene where training keeps about 64.
FINAL_EM_SHARE = 0.125
#: Memory of a spot x gene of the whole chunk, relative to one of the kernel training: the chunk's counts and
#: field are held dense on every spot, and the low-rank model (programmes) keeps a few copies of them.
CHUNK_GENE_SHARE = 0.04


def correct_chunk_mem_mb(wildcards, input, attempt):
    """Memory of a chunk job: a fixed part plus a part per spot x gene optimised at once, times the attempt.

    The lattice operator holds FFT grids of a few times the spot count per gene, for batch_genes genes at a
    time (32 when auto): training on the spots of its window (train_spots), the final EM on all spots. The
    chunk's counts and field are held on every spot for all its genes. With
    operator: pairs, each spot holds its neighbours within the radius (the configured cutoff, else its upper
    bound max_cutoff: the derived one is not known before the job).
    """
    options = config["correct"]
    batch = options["batch_genes"] if options["batch_genes"] != "auto" else 32
    genes_at_once = min(options["chunk_size"], batch)
    per_spot = 1.0
    if options["operator"] == "pairs":
        radius = options["cutoff"] or options["max_cutoff"]
        per_spot = PAIR_GENE_SHARE * HEX_NEIGHBOURS_PER_SQUARED_PITCH * radius**2
    spots = count_spots(input.prepared)
    trained = min(spots, options["train_spots"] or spots)
    spot_genes = (trained + FINAL_EM_SHARE * spots) * per_spot * genes_at_once
    spot_genes += CHUNK_GENE_SHARE * spots * options["chunk_size"]
    return per_spot_gene_request("correct_chunk", "mem_mb", spot_genes, attempt)


def simulation_mem_mb(wildcards, attempt):
    """Memory of a simulation job: a fixed part plus a part per rendered spot (Visium) or 2 um bin (Visium
    HD) x gene, times the attempt."""
    options = dict(simulation_params(wildcards))
    if is_simulated_hd(wildcards.sample):
        from undiffuse.simulate_hd import HDSimulationParams

        params = HDSimulationParams.from_dict(options, preset=options.pop("preset"))
        spots, genes = params.width_um * params.height_um / 4.0, params.n_genes
    else:
        spots, genes = options["n_rows"] * options["n_cols"], options["n_genes"]
    return per_spot_gene_request("simulate", "mem_mb", spots * genes, attempt)


def count_corrected_genes(corrected):
    """Number of corrected genes of corrected.h5ad (var['undiffuse_corrected']), read without the data;
    prepare's n_top_genes before the file exists."""
    try:
        import h5py

        with h5py.File(corrected, "r") as handle:
            return int(handle["var"]["undiffuse_corrected"][()].sum())
    except (ImportError, OSError, KeyError):
        return config["prepare"]["n_top_genes"]


def report_mem_mb(wildcards, input, attempt):
    """Memory of a report job: a fixed part plus a part per spot x corrected gene, times the attempt."""
    spot_genes = count_spots(input.corrected) * count_corrected_genes(input.corrected)
    return per_spot_gene_request("report", "mem_mb", spot_genes, attempt)


def correct_chunk_runtime(wildcards, input, attempt):
    """Wall time of a chunk job in minutes: a fixed part plus a part per spot (or HD bin) x gene of the chunk,
    times the attempt."""
    spot_genes = count_spots(input.prepared) * config["correct"]["chunk_size"]
    return per_spot_gene_request("correct_chunk", "runtime", spot_genes, attempt)


def all_outputs():
    """The default targets: every sample's corrected data, and the reports when their rules exist."""
    targets = expand(
        f"{RESULTS}/{{sample}}/{{name}}",
        sample=SAMPLES,
        name=["corrected.h5ad", "parameters.tsv"],
    )
    if REPORT_RULES.exists():
        targets += expand(f"{RESULTS}/{{sample}}/report.html", sample=SAMPLES)
        targets.append(f"{RESULTS}/summary.html")
    return targets
