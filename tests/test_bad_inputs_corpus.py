"""The bad-input corpus of issue 13 (``tests/bad_inputs/corpus.py``), built from the real mouse brain sample.

Every case goes through the library and the command line: an ``InputError`` or ``ConfigError`` naming the
file and the problem, exit status 2 with one line and no traceback, and no output left behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs.corpus import CASE_BUILDERS, Case, build_corpus

from undiffuse.cli import main
from undiffuse.errors import ConfigError, InputError

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

#: Cases without a command of their own: correct()'s in-memory check and the workflow's sample sheet.
LIBRARY_ONLY = {"prepared_h5ad_nan_in_memory", "sample_sheet_without_sample_column"}


@pytest.fixture(scope="session")
def corpus(shared_data, tmp_path_factory) -> dict[str, Case]:
    from undiffuse.prepare import prepare_sample

    outs = shared_data / "visium_mouse_brain_raw_top100" / "outs"
    prepared = tmp_path_factory.mktemp("real_prepared")
    prepare_sample(outs, prepared)
    cases = build_corpus(outs, prepared / "prepared.h5ad", tmp_path_factory.mktemp("bad_inputs"))
    return {case.name: case for case in cases}


def _leftovers(case: Case) -> list[Path]:
    found = [path for path in case.outputs if path.exists()]
    for output in case.outputs:
        if output.parent.is_dir() and not str(output).startswith("/proc"):
            found += list(output.parent.glob("*.partial"))
    return found


def test_every_issue_case_is_in_the_corpus(corpus):
    covered = {case.issue for case in corpus.values()}
    assert {str(k) for k in range(1, 13)} - {"7"} <= covered  # 7 (SIGTERM) is test_interrupt.py
    assert {"held", "registration"} <= covered


@pytest.mark.parametrize("name", CASE_BUILDERS)
def test_library_raises_naming_the_file(corpus, name):
    case = corpus[name]
    with pytest.raises((InputError, ConfigError)) as caught:
        case.library()
    message = str(caught.value)
    assert case.phrase in message
    if case.culprit is not None:
        assert case.culprit in message
    assert "\n" not in message
    assert not _leftovers(case)


@pytest.mark.parametrize("name", [name for name in CASE_BUILDERS if name not in LIBRARY_ONLY])
def test_cli_exits_2_with_one_line(corpus, name, capsys):
    case = corpus[name]
    try:
        status = main(case.argv)
    except SystemExit as exit_:  # argparse rejects bad options itself, with status 2
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"undiffuse {case.argv[0]}: error: ")
    assert case.phrase in lines[-1]
    if case.culprit is not None:
        assert case.culprit in lines[-1]
    assert not _leftovers(case)


def test_console_script_exit_status_and_single_line(corpus):
    """Two cases through a real process: status 2, stderr of one line, nothing on stdout."""
    for name in ("prepared_h5ad_with_nan", "config_yaml_syntax_error"):
        case = corpus[name]
        result = subprocess.run(
            [sys.executable, "-m", "undiffuse", *case.argv], capture_output=True, text=True, check=False
        )
        assert result.returncode == 2
        assert (
            result.stderr.count("\n") == 1 and case.culprit in result.stderr and case.phrase in result.stderr
        )
        assert "Traceback" not in result.stderr and not result.stdout
        assert not _leftovers(case)
