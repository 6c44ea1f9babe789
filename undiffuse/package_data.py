"""Files shipped inside the package: the config schemas, the report notebook templates and the marker lists.

They are package data (``undiffuse/schemas``, ``undiffuse/notebooks``, ``undiffuse/markers``), so that an
installed undiffuse finds them wherever it is installed; ``config/schemas`` and ``resources/`` of the checkout
link to these folders. Light on purpose: the Snakefile imports it at start-up.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The package's folder. pip installs package data as plain files, so it has a filesystem path, which
#: jsonschema, papermill and the Snakefile's rule inputs need.
PACKAGE_DIR = Path(str(files(__package__)))

#: JSON schemas of the workflow config and of a sample sheet row.
SCHEMA_DIR = PACKAGE_DIR / "schemas"
CONFIG_SCHEMA = SCHEMA_DIR / "config.schema.yaml"
SAMPLES_SCHEMA = SCHEMA_DIR / "samples.schema.yaml"

#: Parameterised notebooks of the per-sample report and of the summary across samples.
NOTEBOOKS_DIR = PACKAGE_DIR / "notebooks"
REPORT_NOTEBOOK = NOTEBOOKS_DIR / "report.ipynb"
SUMMARY_NOTEBOOK = NOTEBOOKS_DIR / "summary.ipynb"

#: Marker tables (``cell_type<TAB>gene``) for the cell-type maps.
MARKERS_DIR = PACKAGE_DIR / "markers"
SIMULATED_MARKERS = MARKERS_DIR / "simulated.tsv"
