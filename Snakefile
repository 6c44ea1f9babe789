"""undiffuse: correct lateral mRNA diffusion in spatial transcriptomics, sample by sample.

Per sample: simulate (demo samples only) -> prepare -> init_quantiles (checkpoint) -> correct_chunk (one job per
gene chunk) -> merge -> report; across samples: summary. See config/README.md for the configuration.
"""

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

#: The working directory's config/config.yaml, else the workflow's own (for runs with --directory elsewhere).
DEFAULT_CONFIG = Path("config/config.yaml")


configfile: DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else Path(workflow.basedir) / DEFAULT_CONFIG


include: "rules/common.smk"
include: "rules/simulate.smk"
include: "rules/prepare.smk"
include: "rules/quantiles.smk"
include: "rules/correct.smk"
include: "rules/merge.smk"
include: "rules/superres.smk"
include: "rules/spatialdata.smk"
include: "rules/aggregate.smk"


if REPORT_RULES.exists():

    include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
        SUPERRES_TARGETS,
        SPATIALDATA_TARGETS,
        AGGREGATE_TARGETS,
