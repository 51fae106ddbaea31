"""R8 storage admin: crafted CIFAR-10 batch files must not run code, nor pass as training data.

The data folder sits on storage the host controls, and the loader runs inside ps0 and every
worker after they attested. Each hostile file here would run code under a plain
``pickle.load``: it writes a marker file, and the test asserts the marker is absent and the
loader answered with one ConfigError naming the file and the fix. Further cases are files of
the wrong structure (they must not be taken as data), and the optional pinned SHA-256 digests
of the batch files (``data_sha256``), which the participant's MR_CONFIG_ID measures.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hfl_lab._exceptions import ConfigError
from hfl_lab.config import LabConfig
from hfl_lab.tee import measure_workload
from tests.reliability_report import record
from trainer.data import TEST_FILE, TRAIN_FILES, dataset_digests, load_cifar10
from trainer.participant_config import Deployment, ParticipantConfig

MARKER = "code-ran"


@dataclass(frozen=True)
class _Call:
    """Pickles as the call ``func(*args)``: what a crafted batch file does when it is loaded."""

    func: Callable[..., object]
    args: tuple[object, ...]

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args


def _hostile_batch(payload: object) -> bytes:
    """A batch that looks like CIFAR-10 but whose ``data`` entry is a call."""
    return pickle.dumps(
        {b"batch_label": b"training batch 1 of 5", b"labels": [0], b"data": payload}, protocol=2
    )


def _touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _write(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def _os_system(marker: Path, _: Path) -> bytes:
    return _hostile_batch(_Call(os.system, (_touch(marker),)))  # pickled as posix.system


def _exec(marker: Path, _: Path) -> bytes:
    return _hostile_batch(_Call(exec, (_write(marker),)))


def _eval(marker: Path, _: Path) -> bytes:
    return _hostile_batch(_Call(eval, (_write(marker),)))


def _partial(marker: Path, _: Path) -> bytes:
    return _hostile_batch(_Call(functools.partial(os.system, _touch(marker)), ()))


def _subprocess_run(marker: Path, _: Path) -> bytes:
    return _hostile_batch(_Call(subprocess.run, (["touch", str(marker)],)))


def _popen(marker: Path, _: Path) -> bytes:
    # Popen(["touch", marker]), kept in memo 0, then getattr(it, "wait")(): the file is there
    # when loading returns, so the test does not depend on timing.
    return (
        f"csubprocess\nPopen\n((Vtouch\nV{marker}\nltRp0\n0"
        "cbuiltins\ngetattr\n(g0\nVwait\ntR)R."
    ).encode()


def _attrgetter(marker: Path, _: Path) -> bytes:
    # operator.attrgetter("system")(importlib.import_module("os"))("touch marker")
    return (
        "coperator\nattrgetter\n(Vsystem\ntR"
        f"(cimportlib\nimport_module\n(Vos\ntRtR(V{_touch(marker)}\ntR."
    ).encode()


def _global_call(module: str, name: str) -> Callable[[Path, Path], bytes]:
    def build(marker: Path, _: Path) -> bytes:
        return f"c{module}\n{name}\n(V{_touch(marker)}\ntR.".encode()

    return build


def _numpy_runstring(marker: Path, _: Path) -> bytes:
    # numpy's own test helper exec()s a string: a naive "admit numpy" list lets it through.
    return f"cnumpy.testing._private.utils\nrunstring\n(V{_write(marker)}\n(dtR.".encode()


def _numpy_load(marker: Path, folder: Path) -> bytes:
    # numpy.load(file, None, True) unpickles an object array written beside the batch.
    npy = folder / "payload.npy"
    np.save(npy, np.array([_Call(os.system, (_touch(marker),))], dtype=object), allow_pickle=True)
    return f"cnumpy\nload\n(V{npy}\nNI01\ntR.".encode()


def _object_array(marker: Path, _: Path) -> bytes:
    # The admitted numpy array machinery, asked for an object array holding a call.
    return _hostile_batch(np.array([_Call(os.system, (_touch(marker),))], dtype=object))


#: case -> (builder(marker, folder) -> file bytes, the global the refusal must name)
HOSTILE: dict[str, tuple[Callable[[Path, Path], bytes], str]] = {
    "os.system": (_os_system, "posix.system"),
    "posix.system by name": (_global_call("posix", "system"), "posix.system"),
    "nt.system by name": (_global_call("nt", "system"), "nt.system"),
    "builtins.exec": (_exec, "builtins.exec"),
    "builtins.eval": (_eval, "builtins.eval"),
    "functools.partial": (_partial, "functools.partial"),
    "subprocess.run": (_subprocess_run, "subprocess.run"),
    "subprocess.Popen": (_popen, "subprocess.Popen"),
    "operator.attrgetter": (_attrgetter, "operator.attrgetter"),
    "numpy.load": (_numpy_load, "numpy.load"),
    "numpy runstring": (_numpy_runstring, "numpy.testing._private.utils.runstring"),
    "numpy object array": (_object_array, "object"),
}


def _linked_copy(cifar_dir: Path, tmp_path: Path) -> Path:
    """A batches folder of symlinks to the shared files, so one file can be replaced cheaply."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for source in (cifar_dir / "cifar-10-batches-py").iterdir():
        (folder / source.name).symlink_to(source)
    return folder


def _replace(folder: Path, name: str, content: bytes) -> None:
    (folder / name).unlink()
    (folder / name).write_bytes(content)


def _refusal(data_path: Path, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as excinfo:
        load_cifar10(data_path, **kwargs)  # type: ignore[arg-type]
    return excinfo.value


# ---------------------------------------------------------------------- files that run code


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("target", ["data_batch_1", "test_batch"])
def test_crafted_batch_file_runs_no_code(
    case: str, target: str, tmp_path: Path, cifar_dir: Path
) -> None:
    # Arrange
    build, refused_global = HOSTILE[case]
    folder = _linked_copy(cifar_dir, tmp_path)
    marker = tmp_path / MARKER
    _replace(folder, target, build(marker, tmp_path))

    # Act
    error: ConfigError | None = None
    try:
        load_cifar10(tmp_path)
    except ConfigError as e:
        error = e
    ran = marker.exists()
    record("R8", f"data file {target}: {case}", held=int(error is not None and not ran),
           code_executed=int(ran))

    # Assert
    assert not ran, f"unpickling {target} ran the payload ({case})"
    assert error is not None
    message = str(error)
    assert target in message and refused_global in message
    assert "Fix:" in message and "data_path" in message
    assert error.__cause__ is None and error.__suppress_context__  # one sentence, no chain


def test_hostile_batches_meta_is_never_read(tmp_path: Path, cifar_dir: Path) -> None:
    # Arrange: batches.meta (label names) is not needed for training; it must stay unread.
    folder = _linked_copy(cifar_dir, tmp_path)
    marker = tmp_path / MARKER
    _replace(folder, "batches.meta", _os_system(marker, tmp_path))

    # Act
    data = load_cifar10(tmp_path)
    pins = dataset_digests(tmp_path)
    ran = marker.exists()
    record("R8", "data file batches.meta: os.system", held=int(not ran), code_executed=int(ran))

    # Assert
    assert not ran
    assert data.train_images.shape == (4660, 32, 32, 3)
    assert not any(p.startswith("batches.meta=") for p in pins)


def test_official_python2_numpy1_module_names_are_admitted(
    tmp_path: Path, cifar_dir: Path
) -> None:
    # Arrange: the official files were written by Python 2 with numpy 1, whose arrays name
    # numpy.core.multiarray; the shared subset names numpy._core.multiarray (numpy 2).
    folder = _linked_copy(cifar_dir, tmp_path)
    raw = (cifar_dir / "cifar-10-batches-py" / "test_batch").read_bytes()
    old = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n", 1)
    assert old != raw
    _replace(folder, "test_batch", old)

    # Act
    data = load_cifar10(tmp_path)

    # Assert
    assert data.test_images.shape == (846, 32, 32, 3)
    assert data.test_labels.min() >= 0 and data.test_labels.max() <= 9


def test_labels_as_an_integer_array_are_admitted(tmp_path: Path, cifar_dir: Path) -> None:
    # Arrange: some re-packed copies hold the labels as a numpy int array, not a list.
    folder = _linked_copy(cifar_dir, tmp_path)
    data = np.zeros((4, 3072), np.uint8)
    content = {b"data": data, b"labels": np.array([0, 1, 2, 9], dtype=np.int64)}
    _replace(folder, "test_batch", pickle.dumps(content, protocol=2))

    # Act
    loaded = load_cifar10(tmp_path)

    # Assert
    assert loaded.test_labels.tolist() == [0, 1, 2, 9]
    assert loaded.test_images.shape == (4, 32, 32, 3)


# ---------------------------------------------------------------------- files of the wrong shape

_ROWS = np.zeros((3, 3072), np.uint8)

MALFORMED: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "corrupt"),
    "not a mapping": (pickle.dumps([1, 2, 3], protocol=2), "not a mapping"),
    "missing data": (pickle.dumps({b"labels": [1, 2, 3]}, protocol=2), "b'data'"),
    "missing labels": (pickle.dumps({b"data": _ROWS}, protocol=2), "b'labels'"),
    "text keys": (pickle.dumps({"data": _ROWS, "labels": [0, 1, 2]}, protocol=2), "b'data'"),
    "data as nested lists": (
        pickle.dumps({b"data": _ROWS.tolist(), b"labels": [0, 1, 2]}, protocol=2), "uint8"),
    "data float64": (
        pickle.dumps({b"data": _ROWS.astype(np.float64), b"labels": [0, 1, 2]}, protocol=2),
        "uint8"),
    "data wrong row length": (
        pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, protocol=2),
        "(N, 3072)"),
    "labels count mismatch": (
        pickle.dumps({b"data": _ROWS, b"labels": [0, 1]}, protocol=2), "(N, 3072)"),
    "labels out of range": (
        pickle.dumps({b"data": _ROWS, b"labels": [0, 1, 10]}, protocol=2), "0..9"),
    "labels negative": (pickle.dumps({b"data": _ROWS, b"labels": [0, -1, 2]}, protocol=2), "0..9"),
    "labels as floats": (
        pickle.dumps({b"data": _ROWS, b"labels": [0.0, 1.5, 2.0]}, protocol=2), "integer"),
    "labels as booleans": (
        pickle.dumps({b"data": _ROWS, b"labels": [True, False, True]}, protocol=2), "integer"),
    "codec other than latin1": (b"c_codecs\nencode\n(Vx\nVrot13\ntR.", "_codecs.encode"),
    "numpy.ndarray called directly": (b"cnumpy\nndarray\n((I1\nttR.", "numpy.ndarray"),
    "admitted global modified by BUILD": (b"cnumpy\ndtype\n}(V__call__\nI1\nub.", "modify"),
    "structured array": (
        pickle.dumps({b"data": np.zeros(3, dtype=[("a", "u1")]), b"labels": [0]}, protocol=2),
        "structured"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_batch_file_gives_a_clear_error(
    case: str, tmp_path: Path, cifar_dir: Path
) -> None:
    # Arrange
    content, expected = MALFORMED[case]
    folder = _linked_copy(cifar_dir, tmp_path)
    _replace(folder, "data_batch_2", content)

    # Act
    error: ConfigError | None = None
    try:
        load_cifar10(tmp_path)
    except ConfigError as e:
        error = e
    record("R8", f"data file data_batch_2: {case}", held=int(error is not None),
           code_executed=0)

    # Assert
    assert error is not None, f"{case}: the file was taken as training data"
    message = str(error)
    assert "data_batch_2" in message and expected in message
    assert "Fix:" in message and "data_path" in message


def test_restricted_loading_gives_what_pickle_gives(cifar_dir: Path) -> None:
    # Arrange: the shared files are trusted fixtures, so plain pickle may read them here.
    folder = cifar_dir / "cifar-10-batches-py"
    plain = []
    for name in (*TRAIN_FILES, TEST_FILE):
        with open(folder / name, "rb") as f:
            plain.append(pickle.load(f, encoding="bytes"))

    # Act
    data = load_cifar10(cifar_dir)

    # Assert
    rows = np.concatenate([p[b"data"] for p in plain[:5]])
    nhwc = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(data.train_images, nhwc)
    labels = np.concatenate([p[b"labels"] for p in plain[:5]])
    np.testing.assert_array_equal(data.train_labels, labels)
    np.testing.assert_array_equal(data.test_labels, plain[5][b"labels"])


def test_truncated_batch_file_is_named(tmp_path: Path, cifar_dir: Path) -> None:
    # Arrange
    folder = _linked_copy(cifar_dir, tmp_path)
    raw = (cifar_dir / "cifar-10-batches-py" / "data_batch_4").read_bytes()
    _replace(folder, "data_batch_4", raw[: len(raw) // 2])

    # Act
    error = _refusal(tmp_path)
    record("R8", "data file data_batch_4: truncated", held=1, code_executed=0)

    # Assert
    assert "data_batch_4" in str(error) and "corrupt" in str(error)
    assert "Fix:" in str(error)


# ---------------------------------------------------------------------- pinned digests


@pytest.fixture(scope="module")
def pins(cifar_dir: Path) -> tuple[str, ...]:
    return dataset_digests(cifar_dir)


def test_dataset_digests_pin_every_file_the_loader_reads(
    cifar_dir: Path, pins: tuple[str, ...]
) -> None:
    folder = cifar_dir / "cifar-10-batches-py"
    expected = tuple(
        f"{name}={hashlib.sha256((folder / name).read_bytes()).hexdigest()}"
        for name in (*TRAIN_FILES, TEST_FILE)
    )
    assert pins == expected
    assert dataset_digests(folder) == pins  # the batches folder itself works too
    assert LabConfig(data_sha256=pins).data_sha256 == pins


def test_pins_are_part_of_the_measured_configuration(
    tmp_path: Path, cifar_dir: Path, pins: tuple[str, ...]
) -> None:
    # Arrange
    deployment = Deployment(trust_address="127.0.0.1:50051", ps_address="127.0.0.1:50052",
                            workers=2)
    pinned = LabConfig(data_path=str(cifar_dir), data_sha256=pins)
    unpinned = pinned.replace(data_sha256=None)

    # Act
    ParticipantConfig.write(tmp_path / "pinned.yaml", deployment, pinned)
    ParticipantConfig.write(tmp_path / "unpinned.yaml", deployment, unpinned)
    document = ParticipantConfig.load(tmp_path / "pinned.yaml")
    plain = ParticipantConfig.load(tmp_path / "unpinned.yaml")

    # Assert
    assert document.lab.data_sha256 == pins
    assert document.measured()["lab"]["data_sha256"] == list(pins)
    assert plain.lab.data_sha256 is None
    ids = {
        measure_workload(role="worker0", config=c.measured()).mr_config_id
        for c in (document, plain)
    }
    assert len(ids) == 2


def test_pinned_copy_loads(cifar_dir: Path, pins: tuple[str, ...]) -> None:
    data = load_cifar10(cifar_dir, sha256=pins)
    assert data.train_images.shape == (4660, 32, 32, 3)


def test_swapped_genuine_batch_is_refused_by_its_digest(
    tmp_path: Path, cifar_dir: Path, pins: tuple[str, ...]
) -> None:
    # Arrange: a well-formed CIFAR-10 file, but not the one pinned (a poisoning swap).
    folder = _linked_copy(cifar_dir, tmp_path)
    swapped = (cifar_dir / "cifar-10-batches-py" / "data_batch_2").read_bytes()
    _replace(folder, "data_batch_1", swapped)
    expected = dict(p.split("=") for p in pins)["data_batch_1"]

    # Act
    error = _refusal(tmp_path, sha256=pins)
    record("R8", "data file data_batch_1: genuine batch swapped under a pin", held=1,
           code_executed=0)

    # Assert
    message = str(error)
    assert "data_batch_1" in message
    assert expected in message and hashlib.sha256(swapped).hexdigest() in message
    assert "Fix:" in message


def test_hostile_file_under_a_pin_is_refused_before_unpickling(
    tmp_path: Path, cifar_dir: Path, pins: tuple[str, ...]
) -> None:
    # Arrange
    folder = _linked_copy(cifar_dir, tmp_path)
    marker = tmp_path / MARKER
    _replace(folder, "test_batch", _os_system(marker, tmp_path))

    # Act
    error = _refusal(tmp_path, sha256=pins)
    ran = marker.exists()
    record("R8", "data file test_batch: os.system under a pin", held=int(not ran),
           code_executed=int(ran))

    # Assert
    assert not ran
    assert "SHA-256" in str(error) and "test_batch" in str(error)


@pytest.mark.parametrize(
    ("pins_given", "expected"),
    [
        (["data_batch_1=xyz"], "64 hex digits"),
        (["data_batch_1"], "name=hex"),
        (["data_batch1=" + "0" * 64], "did you mean 'data_batch_1'"),
        (["data_batch_1=" + "0" * 64], "missing"),
        ([f"{n}={'0' * 64}" for n in (*TRAIN_FILES, TEST_FILE, "data_batch_1")], "twice"),
        ("data_batch_1=" + "0" * 64, "list of str"),
    ],
)
def test_bad_pins_are_refused_by_the_config(pins_given: object, expected: str) -> None:
    with pytest.raises(ConfigError, match="data_sha256") as excinfo:
        LabConfig(data_sha256=pins_given)  # type: ignore[arg-type]
    assert expected in str(excinfo.value)


def test_pins_are_normalized_and_read_from_the_cli(pins: tuple[str, ...]) -> None:
    upper = tuple(p.split("=")[0] + "=" + p.split("=")[1].upper() for p in pins)
    assert LabConfig(data_sha256=upper).data_sha256 == pins
    assert LabConfig.from_cli([f"data_sha256=[{', '.join(pins)}]"]).data_sha256 == pins


def test_dataset_digests_of_a_folder_without_batches(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CIFAR-10 batch files"):
        dataset_digests(tmp_path)
