"""Config loading: the packaged demo, validation errors naming key and file, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_packaged_demo_config_loads() -> None:
    cfg = load_config(None)
    assert cfg.model.spatial_dims == 3
    assert cfg.data.dataset is None and cfg.data.synthetic_cases > 0
    assert cfg.mlflow.model_name == "unet-demo"
    assert cfg.train.time_budget_minutes is not None


def test_every_shipped_config_is_valid() -> None:
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


# The configs a user copies for a task. The packaged demo (demo.yaml) is left out on purpose: it spells every
# key out so that `make demo` keeps its behaviour whatever the defaults become.
TASK_CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                      if p.name != "demo.yaml")


def test_the_task_configs_are_all_checked() -> None:
    assert {"hippocampus.yaml", "hn_ct.yaml", "left_atrium.yaml"} <= {p.name for p in TASK_CONFIGS}


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: p.name)
def test_a_task_config_says_only_what_differs_from_the_defaults(path: Path) -> None:
    from pipeline.config import PipelineConfig

    load_config(path)  # valid
    defaults = PipelineConfig()
    raw = yaml.safe_load(path.read_text())
    # YAML's 0.00003 equals the default 3e-5 and 5 equals 5.0: plain equality is what the loader's coercion keeps.
    restated = [f"{section}.{key}: {value!r}" for section, values in raw.items() for key, value in values.items()
                if value == getattr(getattr(defaults, section), key)]
    assert not restated, f"{path.name} restates the defaults (remove these keys): {', '.join(restated)}"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"epocs": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epocs" in str(err.value) and str(path) in str(err.value)


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, {"trainer": {"epochs": 3}})
    with pytest.raises(ConfigError, match="unknown section 'trainer'"):
        load_config(path)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "epochs", "ten", "an integer"),
        ("train", "epochs", 2.5, "an integer"),
        ("train", "amp", "yes", "true/false"),
        ("model", "norm", "group", "'batch' or 'instance'"),
        ("model", "spatial_dims", 4, "2 or 3"),
        ("model", "features", 16, "a list of an integer"),
        ("qc", "estimator", "isotonic", "'linear' or 'agreement'"),
    ],
)
def test_wrong_type_names_key_and_expected_type(tmp_path, section, key, value, expected) -> None:
    path = write(tmp_path, {section: {key: value}, "data": {"synthetic_cases": 4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"'{section}.{key}'" in message and expected in message and str(path) in message


def test_out_of_range_value(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"synthetic_cases": 4, "num_folds": 5, "fold": 5}})
    with pytest.raises(ConfigError, match="data.fold"):
        load_config(path)


def test_patch_too_small_for_depth(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"synthetic_cases": 4},
                            "model": {"features": [4, 8, 16, 32]}, "train": {"patch_size": [4, 8, 8]}})
    with pytest.raises(ConfigError, match="train.patch_size"):
        load_config(path)


def test_set_overrides_and_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"synthetic_cases": 4}, "train": {"epochs": 3}})
    cfg = load_config(path, ["train.epochs=7", "train.time_budget_minutes=1.5", "mlflow.model_name=abc"])
    assert (cfg.train.epochs, cfg.train.time_budget_minutes, cfg.mlflow.model_name) == (7, 1.5, "abc")
    with pytest.raises(ConfigError, match="'train.epochs' must be an integer"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["epochs=3"])


def test_relative_dataset_path_resolves_against_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"dataset": "data/dataset.json"}})
    assert load_config(path).data.dataset == str((tmp_path / "data" / "dataset.json").resolve())


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
