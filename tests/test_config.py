"""Config loading and validation: defaults filled in, bad values rejected with a clear message."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from undiffuse.config import (
    CONFIG_SCHEMA,
    WORKFLOW_ONLY_CORRECT_KEYS,
    correction_options,
    load_config,
    read_sample_sheet,
    simulation_options,
    validate_config,
)
from undiffuse.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_fill_every_section():
    config = load_config()
    assert config["samples"] == "config/samples.tsv"
    assert config["correct"]["chunk_size"] == 100
    assert config["correct"]["weights"]["poisson"] == 100.0
    assert config["init_quantiles"]["grid"] == {"start": 0.0, "stop": 0.95, "step": 0.05}
    assert config["resources"]["merge"] == {"threads": 1, "mem_mb": 4000, "runtime": 60}
    assert config["resources"]["correct_chunk"]["mem_mb_per_million_spot_genes"] > 0


def test_partial_sections_keep_given_values_and_fill_the_rest():
    config = validate_config({"correct": {"epochs": 7, "weights": {"moran": 2.5}}})
    assert config["correct"]["epochs"] == 7
    assert config["correct"]["weights"] == {
        "image": 1.0,
        "out_of_tissue": 1.0,
        "moran": 2.5,
        "poisson": 100.0,
        "kernel_prior": 100.0,
    }
    assert config["correct"]["operator"] == "auto"


def test_validation_does_not_change_its_input():
    given = {"correct": {"epochs": 7}}
    validate_config(given)
    assert given == {"correct": {"epochs": 7}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"correct": {"chunk_size": 0}}, r"correct\.chunk_size: 0 is less than the minimum of 1"),
        ({"correct": {"operator": "sinkhorn"}}, r"correct\.operator: 'sinkhorn' is not one of"),
        ({"correct": {"mode": "balanced"}}, r"correct: Additional properties are not allowed \('mode'"),
        ({"correct": {"device": "tpu"}}, r"correct\.device"),
        ({"correct": {"weights": {"moran": -1}}}, r"correct\.weights\.moran"),
        ({"correct": {"r_init": 0}}, r"correct\.r_init"),
        ({"correct": {"prior_strength": -1}}, r"correct\.prior_strength"),
        ({"correct": {"prior_strength": "strong"}}, r"correct\.prior_strength"),
        ({"simulation": {"bleed": 1.5}}, r"simulation\.bleed"),
        ({"simulation": {"n_rowz": 20}}, r"simulation: Additional properties are not allowed \('n_rowz'"),
        ({"init_quantiles": {"grid": {"step": 0}}}, r"init_quantiles\.grid\.step"),
        ({"prepare": {"refine_mask": "yes"}}, r"prepare\.refine_mask: 'yes' is not of type 'boolean'"),
        ({"corect": {}}, r"\(top level\): Additional properties are not allowed \('corect'"),
    ],
)
def test_bad_values_are_rejected_with_the_key_and_the_rule(config, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(config, source="my.yaml")


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("correct:\n  epochs: -3\n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid config: correct\.epochs"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(InputError, match="YAML mapping"):
        load_config(path)
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["config/config.yaml", "config/test/config.yaml"])
def test_shipped_configs_and_sheets_are_valid(name):
    config = load_config(REPO / name)
    sheet = read_sample_sheet(REPO / config["samples"])
    assert len(sheet) >= 1
    assert sheet.index.is_unique


def test_test_config_has_two_simulated_samples_and_one_hd_sample():
    sheet = read_sample_sheet(REPO / load_config(REPO / "config/test/config.yaml")["samples"])
    assert list(sheet["input"]) == ["simulate", "simulate", "simulate_hd"]
    assert sheet["seed"].nunique() == 3


def test_schema_defaults_match_the_library():
    """The schema documents the library's defaults (CorrectionConfig, prepare_sample, SimulationParams)."""
    from undiffuse.correct import CorrectionConfig
    from undiffuse.prepare import prepare_sample
    from undiffuse.simulate import SimulationParams

    defaults = load_config()
    library = dataclasses.asdict(CorrectionConfig())
    schema_correct = {k: v for k, v in defaults["correct"].items() if k not in WORKFLOW_ONLY_CORRECT_KEYS}
    assert schema_correct == library

    prepare = inspect.signature(prepare_sample).parameters
    assert {key: prepare[key].default for key in defaults["prepare"]} == defaults["prepare"]

    simulation = dataclasses.asdict(SimulationParams())
    simulation.pop("sample_id")  # the workflow names each simulated library after its sample
    assert defaults["simulation"] == simulation


def test_correction_options_drop_workflow_keys_and_build_a_correction_config():
    from undiffuse.correct import CorrectionConfig

    options = correction_options(validate_config({"correct": {"chunk_size": 3, "epochs": 5}}))
    assert not WORKFLOW_ONLY_CORRECT_KEYS & set(options)
    assert CorrectionConfig(**options).epochs == 5
    assert correction_options(validate_config({"correct": {"gpu": True}}))["device"] == "cuda"
    assert correction_options(validate_config({"correct": {"gpu": True, "device": "cpu"}}))["device"] == "cpu"


def test_simulation_options_take_the_sample_seed_and_name():
    from undiffuse.simulate import SimulationParams

    options = simulation_options(validate_config({"simulation": {"n_rows": 20}}), sample_id="alpha", seed="4")
    assert options["seed"] == 4 and options["sample_id"] == "alpha" and options["n_rows"] == 20
    assert SimulationParams(**options).n_rows == 20


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sample\tinput\na\tsimulate\na\tsimulate\n", "repeated: a"),
        ("sample\tinput\nbad name\tsimulate\n", "row 1: .*sample"),
        ("sample\nalpha\n", "lacks the column\\(s\\) input"),
        ("name\tinput\nalpha\tsimulate\n", "lacks the column\\(s\\) sample .*header: name, input"),
        ("sample input\nalpha simulate\n", "lacks the column\\(s\\) sample, input"),
        ("", "is empty"),
        ("sample\tinput\n\xff\xfe\tsimulate\n", "cannot be read as a sample sheet"),
        ("sample\tinput\tseed\nalpha\tsimulate\tx1\n", "row 1: .*seed"),
        ("sample\tinput\n", "no sample"),
    ],
)
def test_sample_sheet_errors_name_the_sheet(tmp_path, content, message):
    path = tmp_path / "samples.tsv"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(InputError, match=message) as raised:
        read_sample_sheet(path)
    assert str(path) in str(raised.value)


def test_readme_documents_every_key():
    readme = (REPO / "config" / "README.md").read_text()
    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())
    missing = [key for key in _leaf_keys(schema, schema) if not _documented(key, readme)]
    assert not missing, f"config/README.md does not document: {missing}"
    samples_schema = yaml.safe_load((REPO / "config/schemas/samples.schema.yaml").read_text())
    assert all(f"`{column}`" in readme for column in samples_schema["properties"])


def _documented(path: str, readme: str) -> bool:
    """A key is documented by its dotted path, by its own name (keys shared by several rules' resources), or
    as the prefix of documented sub-keys (``weights.image``)."""
    name = path.rsplit(".", 1)[-1]
    return f"`{path}`" in readme or f"`{name}`" in readme or f"`{path}." in readme


def _leaf_keys(node: dict, root: dict, prefix: str = "", depth: int = 0) -> set[str]:
    """Every property of a schema, as the README names it: a section's keys by name, deeper keys dotted from
    their section (``grid.start``, ``weights.moran``), following local $refs."""
    if "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    keys = set()
    for name, child in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        keys.add(path)
        keys |= _leaf_keys(child, root, path if depth >= 1 else "", depth + 1)
    return keys


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("correct:\n  epochs: [1\n", "is not valid YAML: .* at line \\d+, column \\d+; fix the syntax"),
        ("correct:\n  epochs: 2.5\n", "correct.epochs: 2.5 is not of type 'integer'"),
        ("correct:\n  weights: 5\n", "correct.weights: 5 is not of type 'object'"),
        ("- a\n- b\n", "must be a YAML mapping"),
    ],
)
def test_config_file_errors_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises((InputError, ConfigError), match=message) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert "\n" not in str(raised.value)


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"correct:\n  epochs: \xff\n")
    with pytest.raises(InputError, match="is not UTF-8 text") as raised:
        load_config(path)
    assert raised.value.path == str(path)
