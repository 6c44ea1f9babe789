"""The README's library section, run as written on a small simulated sample."""

from __future__ import annotations

import re

import numpy as np
from conftest import REPO

#: A sample small enough for the correction's default options.
SMALL_SAMPLE = dict(n_rows=12, n_cols=12, n_genes=6, seed=3)


def readme_library_code() -> str:
    """The Python block of the README's "Library use" section."""
    section = (REPO / "README.md").read_text().split("## Library use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_library_lines_run_and_plot_the_corrected_layer(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from undiffuse.simulate import simulate_sample

    simulate_sample(tmp_path, **SMALL_SAMPLE)
    code = readme_library_code()
    statements = [line for line in code.splitlines() if line and not line.startswith("import ")]
    assert len(statements) == 4, "read, prepare, correct, plot"
    # The README's sample and gene, replaced by the simulated ones; nothing else is changed.
    # The README's sample and gene are replaced by the simulated ones; nothing else is changed.
    *steps, plot = code.replace('"path/to/outs"', repr(str(tmp_path / "outs"))).strip().splitlines()
    assert plot.startswith("sc.pl.spatial(") and 'color="Mbp"' in plot
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    namespace: dict = {}
    exec(compile("\n".join(steps), "README.md", "exec"), namespace)
    adata = namespace["adata"]
    gene = adata.var_names[adata.var["undiffuse_corrected"].to_numpy(bool)][0]
    exec(compile(plot.replace('"Mbp"', repr(gene)), "README.md", "exec"), namespace)
    figure = plt.gcf()
    figure.savefig(tmp_path / "spatial.png")
    plt.close(figure)
    assert (tmp_path / "spatial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What was drawn is the corrected layer of that gene, not the raw counts.
    drawn = np.sort(np.asarray(figure.axes[0].collections[0].get_array(), dtype=np.float64))
    corrected = np.sort(adata[:, gene].layers["corrected"].toarray().ravel())
    raw = np.sort(adata[:, gene].X.toarray().ravel())
    np.testing.assert_allclose(drawn, corrected, rtol=1e-6)
    assert not np.allclose(drawn, raw)


def test_public_functions_keep_their_names_when_their_modules_are_imported():
    import importlib

    import undiffuse

    importlib.import_module("undiffuse.correct")
    importlib.import_module("undiffuse.prepare")
    assert callable(undiffuse.correct) and undiffuse.correct.__module__ == "undiffuse.correct"
    assert callable(undiffuse.prepare) and undiffuse.prepare.__module__ == "undiffuse.prepare"
