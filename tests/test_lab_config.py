"""LabConfig: defaults, every kind of bad parameter, YAML round trip, -p parsing, profiles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hfl_lab._exceptions import ConfigError
from hfl_lab.config import (
    PARAMETER_NAMES,
    LabConfig,
    default_data_path,
    validate_notebook_parameters,
)


def config_error(**params: object) -> str:
    with pytest.raises(ConfigError) as info:
        LabConfig(**params)  # type: ignore[arg-type]
    return str(info.value)


# ---------------------------------------------------------------------- defaults


def test_defaults_are_a_valid_quick_lab() -> None:
    config = LabConfig()

    assert config.profile_name == "quick"
    assert config.backend == "local"
    assert config.workers == 2
    assert config.depth == 8
    assert config.steps == 60 and config.epochs is None
    assert config.batch_size <= 32
    assert config.allow_simulated is True
    assert config.run_dir.startswith("runs/")
    assert config.quorum == 2
    assert config.initial_learning_rate == pytest.approx(0.1 * 2 * config.batch_size / 128)


def test_defaults_equal_the_quick_profile() -> None:
    default = LabConfig().to_dict()
    quick = LabConfig.profile("quick").to_dict()

    default.pop("run_dir"), quick.pop("run_dir")  # timestamps may straddle a second
    assert default == quick


def test_default_data_path_is_the_shared_subset_when_present(shared_dir: Path) -> None:
    expected = shared_dir / "data" / "cifar-10-subset"

    assert Path(default_data_path()) == expected
    assert LabConfig().require_data_path() == expected


def test_missing_data_path_tells_where_to_point_it() -> None:
    config = LabConfig(data_path="")

    with pytest.raises(ConfigError, match="data_path") as info:
        config.require_data_path()
    assert "CIFAR-10 python version" in str(info.value)


def test_config_is_frozen() -> None:
    config = LabConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 3  # type: ignore[misc]


# ---------------------------------------------------------------------- bad parameters


def test_unknown_name_suggests_the_closest_and_lists_all() -> None:
    message = config_error(wokers=3)

    assert "unknown parameter 'wokers'" in message
    assert "did you mean 'workers'" in message
    for name in ("backend", "depth", "aggregation", "k8s_overlay"):
        assert name in message


def test_profile_is_not_a_constructor_parameter() -> None:
    message = config_error(profile="full")

    assert "LabConfig.profile" in message


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="by name"):
        LabConfig("local")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"workers": "4"}, "workers must be an int, got the string '4'"),
        ({"workers": 2.5}, "workers must be an int, got the float 2.5"),
        ({"workers": True}, "workers must be an int, got the bool True"),
        ({"allow_simulated": 1}, "allow_simulated must be a bool, got the int 1"),
        ({"learning_rate": "0.1"}, "learning_rate must be a float or None, got the string"),
        ({"data_path": 3}, "data_path must be a str, got the int 3"),
        ({"steps": 10.0}, "steps must be an int or None"),
        ({"lr_boundaries": 5, "lr_values": [1.0, 2.0]}, "lr_boundaries must be a non-empty list"),
        ({"lr_boundaries": [5], "lr_values": [0.1, "x"]}, "lr_values[1] must be a float"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
    ],
)
def test_wrong_types_name_the_parameter_and_what_was_given(
    params: dict[str, object], expected: str
) -> None:
    assert expected in config_error(**params)


def test_string_for_a_number_explains_the_fix() -> None:
    message = config_error(workers="4")

    assert "without quotes" in message


def test_ints_are_accepted_where_floats_are_expected() -> None:
    config = LabConfig(learning_rate=1, momentum=0, timeout_s=60)

    assert isinstance(config.learning_rate, float) and config.learning_rate == 1.0
    assert isinstance(config.momentum, float)


def test_paths_and_lists_are_normalized(tmp_path: Path) -> None:
    config = LabConfig(run_dir=tmp_path, lr_boundaries=[10, 20], lr_values=[0.1, 0.01, 0.001])  # type: ignore[arg-type]

    assert config.run_dir == str(tmp_path)
    assert config.lr_boundaries == (10, 20)
    assert config.lr_schedule(1000) == ((10, 20), (0.1, 0.01, 0.001), 0)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"workers": -1}, "workers must be ≥ 1"),
        ({"workers": 0}, "workers must be ≥ 1 and ≤ 64"),
        ({"workers": 65}, "got 65"),
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"momentum": 1.0}, "momentum must be ≥ 0 and < 1"),
        ({"epochs": 0, "steps": None}, "epochs must be > 0"),
        ({"vault_size_mb": 4}, "vault_size_mb must be ≥ 8"),
        ({"vault_kdf_iterations": 999}, "vault_kdf_iterations must be ≥ 1000"),
        ({"chunk_bytes": 100}, "chunk_bytes must be ≥ 4096"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha must be > 0"),
    ],
)
def test_out_of_range_values_say_the_range(params: dict[str, object], expected: str) -> None:
    assert expected in config_error(**params)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("backend", "foo", "backend must be one of local, kubernetes, got 'foo'"),
        ("aggregation", "fedvg", "aggregation must be one of sync, async, fedavg"),
        ("partition", "noniid", "partition must be one of iid, dirichlet"),
        ("wire_dtype", "int8", "wire_dtype must be one of float32, float16, bfloat16"),
        ("k8s_overlay", "kata", "k8s_overlay must be one of runc, kata-qemu-tdx,"),
        ("profile_name", "huge", "profile_name must be one of quick, full"),
    ],
)
def test_invalid_choices_list_the_valid_ones(name: str, value: str, expected: str) -> None:
    assert expected in config_error(**{name: value})


def test_close_choice_is_suggested() -> None:
    assert "did you mean fedavg" in config_error(aggregation="fedvg")


@pytest.mark.parametrize("depth", [7, 9, 15, 116, 0])
def test_depth_must_be_6n_plus_2(depth: int) -> None:
    message = config_error(depth=depth)

    assert "depth must be one of 8, 14, 20, 32, 44, 56, 110" in message
    assert "6n+2" in message


@pytest.mark.parametrize("depth", [8, 14, 20, 26, 56, 110])
def test_every_6n_plus_2_depth_is_accepted(depth: int) -> None:
    assert LabConfig(depth=depth).depth == depth


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"steps": 10, "epochs": 2}, "steps (10) and epochs (2.0) are mutually exclusive"),
        ({"sync_quorum": 3}, "sync_quorum must be ≤ workers (2), got 3"),
        ({"lr_boundaries": [10]}, "lr_boundaries and lr_values must be given together"),
        ({"lr_boundaries": [10], "lr_values": [0.1]}, "one more entry than lr_boundaries"),
        ({"lr_boundaries": [20, 10], "lr_values": [0.1, 0.1, 0.1]}, "strictly increasing"),
        ({"reattest_every_s": 900, "cert_lifetime_s": 600}, "must be shorter than"),
        ({"namespace": "Bad_NS"}, "namespace must be a Kubernetes name"),
        ({"image": "has space"}, "image must be a container image reference"),
    ],
)
def test_inconsistent_combinations_are_refused(params: dict[str, object], expected: str) -> None:
    assert expected in config_error(**params)


def test_epochs_alone_replaces_the_default_steps() -> None:
    config = LabConfig(epochs=2)

    assert config.steps is None
    assert config.total_steps(4660) == 2 * (4660 // 64)


# ---------------------------------------------------------------------- replace


def test_replace_validates_and_keeps_steps_and_epochs_exclusive() -> None:
    config = LabConfig()

    by_epochs = config.replace(epochs=3)
    back = by_epochs.replace(steps=7)

    assert (by_epochs.steps, by_epochs.epochs) == (None, 3.0)
    assert (back.steps, back.epochs) == (7, None)
    assert config.steps == 60  # unchanged
    with pytest.raises(ConfigError, match="workers must be ≥ 1"):
        config.replace(workers=0)
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        config.replace(deph=20)


# ---------------------------------------------------------------------- YAML


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_yaml_round_trip(tmp_path: Path, profile: str) -> None:
    config = LabConfig.profile(
        profile,
        lr_boundaries=[100, 200],
        lr_values=[0.1, 0.01, 0.001],
        policy_path="policy.yaml",
        namespace="lab-1",
        run_dir=str(tmp_path / "run"),
    )
    path = tmp_path / "lab.yaml"

    text = config.to_yaml(path)
    loaded = LabConfig.from_yaml(path)

    assert loaded == config
    assert "# number of worker TDs" in text


def test_yaml_profile_key_picks_the_base(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("profile: full\nworkers: 4\n")

    config = LabConfig.from_yaml(path)

    assert (config.profile_name, config.depth, config.workers) == ("full", 56, 4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("workers: [1\n", "not valid YAML at line"),
        ("- workers\n", "must hold a mapping"),
        ("wrkers: 2\n", "did you mean 'workers'"),
        ("workers: '2'\n", "workers must be an int, got the string '2'"),
        ("profile: huge\n", "profile must be one of quick, full"),
    ],
)
def test_bad_yaml_files_are_named_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError) as info:
        LabConfig.from_yaml(path)
    assert expected in str(info.value)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        LabConfig.from_yaml(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------- -p name=value


def test_cli_pairs_are_parsed_as_yaml_scalars() -> None:
    config = LabConfig.from_cli(
        [
            "workers=4",
            "learning_rate=0.05",
            "vault=false",
            "sync_quorum=null",
            "lr_boundaries=[10, 20]",
            "lr_values=[0.1, 0.01, 0.001]",
            "namespace=no",  # YAML 1.1 would read a bool; string parameters stay text
            "image=1.0",
            "epochs=2",
        ]
    )

    assert config.workers == 4
    assert config.learning_rate == 0.05
    assert config.vault is False
    assert config.sync_quorum is None
    assert config.lr_boundaries == (10, 20)
    assert config.namespace == "no" and config.image == "1.0"
    assert (config.steps, config.epochs) == (None, 2.0)


def test_cli_profile_and_base() -> None:
    full = LabConfig.from_cli(["profile=full", "workers=3"])
    over = LabConfig.from_cli(["depth=20"], base=full)

    assert (full.profile_name, full.depth, full.workers) == ("full", 56, 3)
    assert (over.depth, over.workers, over.batch_size) == (20, 3, 128)


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("workers", "not of the form name=value"),
        ("=4", "not of the form name=value"),
        ("wokers=4", "did you mean 'workers'"),
        ("workers=four", "workers must be an int, got the string 'four'"),
        ("workers=", "workers needs a value"),
        ("backend=foo", "backend must be one of local, kubernetes"),
    ],
)
def test_bad_cli_pairs(pair: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        LabConfig.from_cli([pair])
    assert expected in str(info.value)


# ---------------------------------------------------------------------- profiles


def test_quick_profile_is_small() -> None:
    quick = LabConfig.profile("quick")

    assert quick.depth == 8 and quick.workers == 2
    assert quick.steps is not None and quick.steps <= 100
    assert quick.batch_size <= 32


def test_full_profile_is_the_reference() -> None:
    full = LabConfig.profile("full")

    assert (full.depth, full.workers, full.batch_size) == (56, 2, 128)
    assert (full.steps, full.epochs) == (None, 182.0)
    assert (full.momentum, full.weight_decay) == (0.9, 2e-4)
    # 50k images, 2 x 128 per sync step: 195 steps per epoch, decays at epochs 91 and 136
    schedule = full.lr_schedule(50_000)
    assert full.total_steps(50_000) == 182 * 195
    assert schedule.boundaries[:2] == (91 * 195, 136 * 195)
    assert schedule.values[0] == pytest.approx(0.1 * 256 / 128)
    assert schedule.values[1] == pytest.approx(schedule.values[0] / 10)


def test_profile_overrides_and_errors() -> None:
    by_steps = LabConfig.profile("full", steps=1000)

    assert (by_steps.steps, by_steps.epochs, by_steps.depth) == (1000, None, 56)
    with pytest.raises(ConfigError, match="profile must be one of quick, full"):
        LabConfig.profile("huge")
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        LabConfig.profile("quick", deph=20)


def test_steps_per_update_follow_the_aggregation() -> None:
    sync = LabConfig(workers=4, sync_quorum=3, batch_size=10)
    asynchronous = sync.replace(aggregation="async")
    fedavg = sync.replace(aggregation="fedavg", local_steps=5)

    assert (sync.samples_per_step, sync.update_batch_size) == (30, 30)
    assert (asynchronous.samples_per_step, asynchronous.update_batch_size) == (10, 10)
    assert (fedavg.samples_per_step, fedavg.update_batch_size) == (150, 10)
    assert asynchronous.staleness_bound == 4


# ---------------------------------------------------------------------- notebooks


def test_notebook_parameters_become_a_config() -> None:
    import math

    namespace = {
        "profile": "full",
        "workers": 3,
        "steps": 10,
        "attack": "tamper",  # the notebook's own parameter
        "In": [],
        "Out": {},
        "_": None,
        "_i1": "x = 1",
        "math": math,
        "helper": lambda: None,
    }

    config = validate_notebook_parameters(namespace, extra=["attack"])

    assert (config.profile_name, config.workers, config.steps, config.epochs) == (
        "full",
        3,
        10,
        None,
    )


def test_notebook_typo_injected_by_papermill_is_an_error() -> None:
    namespace = {"workers": 2, "wokers": 4}

    with pytest.raises(ConfigError, match=r"unknown parameter 'wokers'.*did you mean 'workers'"):
        validate_notebook_parameters(namespace)


def test_notebook_wrong_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match="depth must be an int, got the string '20'"):
        validate_notebook_parameters({"depth": "20"})


# ---------------------------------------------------------------------- help


def test_help_lists_every_parameter_with_its_doc() -> None:
    text = LabConfig.help_text()

    for name in PARAMETER_NAMES:
        assert f"\n{name} (" in f"\n{text}"
    assert "workers (int, default 2): number of worker TDs [≥ 1, ≤ 64]" in text
    assert "backend (str, default 'local')" in text and "[local | kubernetes]" in text
    assert "local" in LabConfig().describe()


def test_notebook_own_variables_hint_and_non_strict_mode() -> None:
    namespace = {"workers": 3, "accuracy_goal": 0.5}

    with pytest.raises(ConfigError, match=r"extra=\[\.\.\.\]"):
        validate_notebook_parameters(namespace)
    assert validate_notebook_parameters(namespace, strict=False).workers == 3
