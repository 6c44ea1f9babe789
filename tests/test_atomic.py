"""Atomic outputs: grouped commits, stale leftovers, signals held back, output paths checked first."""

from __future__ import annotations

import os
import signal

import pytest

from undiffuse.atomic import (
    atomic_path,
    atomic_paths,
    check_output_path,
    exit_on_signals,
    remove_stale_partials,
    signals_deferred,
)
from undiffuse.errors import InputError

#: Above Linux's largest pid, so no process can have it.
DEAD_PID = 2**22 + 7


def test_stale_leftovers_of_dead_processes_are_removed_on_rerun(tmp_path):
    stale = tmp_path / f".out.h5ad.{DEAD_PID}.abcd1234.partial"
    stale.mkdir()
    (stale / "out.h5ad").write_text("half")
    alive = tmp_path / f".out.h5ad.{os.getpid()}.efgh5678.partial"
    alive.mkdir()
    other = tmp_path / f".out.h5ad.json.{DEAD_PID}.ijkl9012.partial"  # the leftover of another output
    other.mkdir()
    with atomic_path(tmp_path / "out.h5ad") as tmp:
        tmp.write_text("complete")
    assert (tmp_path / "out.h5ad").read_text() == "complete"
    assert not stale.exists() and alive.exists() and other.exists()
    assert remove_stale_partials(tmp_path / "out.h5ad.json") == [other]


def test_grouped_outputs_appear_together_or_not_at_all(tmp_path):
    (tmp_path / "table.tsv").write_text("old")
    with (
        pytest.raises(RuntimeError),
        atomic_paths([(tmp_path / "qc", True), (tmp_path / "table.tsv", False)]) as (
            folder,
            table,
        ),
    ):
        (folder / "qc.json").write_text("{}")
        table.write_text("new")
        raise RuntimeError("fails after writing")
    assert not (tmp_path / "qc").exists() and (tmp_path / "table.tsv").read_text() == "old"
    assert not list(tmp_path.glob("*.partial"))
    with atomic_paths([(tmp_path / "qc", True), (tmp_path / "table.tsv", False)]) as (folder, table):
        (folder / "qc.json").write_text("{}")
        table.write_text("new")
    assert (tmp_path / "qc" / "qc.json").is_file() and (tmp_path / "table.tsv").read_text() == "new"


def test_a_signal_during_the_commit_waits_for_it():
    done = []
    with pytest.raises(SystemExit) as caught, exit_on_signals():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("committed")
        done.append("not reached")
    assert caught.value.code == 128 + signal.SIGTERM
    assert done == ["committed"]


def test_output_paths_are_checked_before_the_work(tmp_path):
    assert (
        check_output_path(tmp_path / "new" / "deeper" / "out.h5ad")
        == tmp_path / "new" / "deeper" / "out.h5ad"
    )
    assert not (tmp_path / "new").exists()
    folder = tmp_path / "folder.h5ad"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder; give a file name") as caught:
        check_output_path(folder)
    assert caught.value.path == str(folder)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="afile is a file, not a folder"):
        check_output_path(afile / "out.h5ad")
    with pytest.raises(InputError, match="the output folder is a file"):
        check_output_path(afile, directory=True)
    with pytest.raises(InputError, match="cannot be written: /proc does not accept new files"):
        check_output_path("/proc/undiffuse-test/out.h5ad")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(InputError, match=r"does not accept new files \(permission denied\)"):
        check_output_path(locked / "out.h5ad")
