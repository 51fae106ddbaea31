"""The workload image made for real (issue 19): built with umoci, encrypted and signed with
skopeo, served by docker-registry on loopback, pulled only through the signature policy and
decrypted only with the layer key the trust service releases to an attested participant."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from hfl_lab import ImageError, ImageRefused
from hfl_lab.config import LabConfig
from hfl_lab.image import (
    IMAGE_APP_ID,
    LAYER_KEY_NAME,
    LabRegistry,
    LayerKey,
    PublishedImage,
    ToolRunner,
    image_release_policy,
    missing_tools,
    obtain_layer_key,
    publish_workload_image,
    pull_image,
    read_image,
    register_layer_key,
    require_tools,
)
from hfl_lab.image.layout import build_workload_image
from hfl_lab.image.publish import ImageSource
from hfl_lab.image.signing import owner_push_policy
from hfl_lab.lab.attacks import image_attacks
from hfl_lab.lab.image import measure_image
from hfl_lab.lab.trust import LabTrustService
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.tee import AttestationPolicy, measure_workload
from hfl_lab.tee.sim.measure import workload_digest
from hfl_lab.trust.proto import trust_pb2 as pb
from tests.image_support import serving_registry
from tests.local_support import processes_mentioning
from tests.secret_support import PRIVATE_KEY_PATTERNS
from tests.td_support import measured, provider
from tests.trust_support import connect, start

REPO = Path(__file__).resolve().parents[1]
MISSING = missing_tools()
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} for the image pipeline: run "
    "`make system-deps` (Debian: skopeo umoci docker-registry gnupg)")

PLAIN = "application/vnd.oci.image.layer.v1.tar+gzip"
ENCRYPTED = PLAIN + "+encrypted"


@dataclass
class Published:
    folder: Path
    registry: LabRegistry
    key: LayerKey
    image: PublishedImage
    runner: ToolRunner


def _signer_homes() -> set[Path]:
    places = [Path("/dev/shm"), Path(tempfile.gettempdir())]
    return {p for place in places if place.is_dir() for p in place.glob("hfl-lab-gpg-*")}


def _publish(folder: Path) -> Iterator[Published]:
    runner = ToolRunner()
    key = LayerKey()
    with serving_registry(folder / "registry", runner) as registry:
        image = publish_workload_image(folder, registry, key.public_pem, root=REPO,
                                       runner=runner)
        yield Published(folder, registry, key, image, runner)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """One published image for the tests that only read (about half a second)."""
    yield from _publish(tmp_path_factory.mktemp("run") / "image")


@pytest.fixture()
def own_image(tmp_path: Path) -> Iterator[Published]:
    """An image of its own, for a test that tampers with the registry."""
    yield from _publish(tmp_path / "image")


def test_build_encrypt_push_sign_and_pull_round_trip(published: Published,
                                                     tmp_path: Path) -> None:
    # Arrange: the owner's side ran every step; the participant holds the layer key
    steps = {r.step: r for r in published.image.records}

    # Act: pull through the signature policy, decrypt, unpack
    pulled = pull_image(published.image.source, published.key.private_pem(),
                        tmp_path / "worker0", who="worker0", runner=published.runner)

    # Assert: each step recorded with its command, time and digest; the unpacked workload is
    # the measured one, byte for byte (so its MR_TD is the reference's)
    for name in ("registry", "build", "encrypt", "push and sign", "verify", "pull", "unpack"):
        record = steps.get(name) or next(r for r in published.runner.records if r.step == name)
        assert record.digest.startswith("sha256:") and record.seconds >= 0, name
        assert record.command_line.split()[0] in ("umoci", "skopeo", "docker-registry")
    assert "--sign-by" in steps["push and sign"].argv
    assert workload_digest(pulled.workload_root) == workload_digest(REPO)
    assert measure_workload(role="worker0", root=pulled.workload_root).mr_td == \
        measured("worker0").mr_td
    assert pulled.entrypoint == ["python", "-m", "trainer"]
    assert pulled.image.config["config"]["WorkingDir"] == "/app"
    assert published.image.source.digest == published.image.encrypted.manifest_digest
    record = json.loads((published.folder / "pipeline.json").read_text())
    assert record["steps"] and record["signer_fingerprint"] == published.image.fingerprint


def test_layers_are_encrypted_after_encryption(published: Published) -> None:
    # Arrange: what the registry serves, as stock skopeo sees it
    source = published.image.source
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--cert-dir", str(source.cert_dir),
         f"docker://{source.reference}"], capture_output=True, text=True, check=True).stdout

    # Act
    served = [layer["mediaType"] for layer in json.loads(raw)["layers"]]
    exported = read_image(published.folder / "oci", "workload")

    # Assert: plain before, encrypted after; the registry and image/oci/ hold only ciphertext
    assert published.image.plain.media_types == [PLAIN]
    assert published.image.encrypted.media_types == [ENCRYPTED]
    assert served == [ENCRYPTED]
    assert exported.media_types == [ENCRYPTED]
    assert exported.manifest_digest == source.digest
    assert not (published.folder / "build").exists()
    policy = json.loads((published.folder / "policy.json").read_text())
    rule = policy["transports"]["docker"][source.reference.rsplit(":", 1)[0]][0]
    assert policy["default"] == [{"type": "reject"}] and rule["type"] == "signedBy"
    assert (published.folder / "signer.asc").read_text().startswith(
        "-----BEGIN PGP PUBLIC KEY BLOCK-----")


def test_a_pull_of_an_unsigned_image_is_refused(published: Published, tmp_path: Path) -> None:
    # Arrange: someone with push access puts an image the owner never signed in the registry
    root = tmp_path / "other"
    (root / "trainer").mkdir(parents=True)
    (root / "trainer" / "__init__.py").write_text("print('not the lab')\n")
    runner = ToolRunner()
    other = build_workload_image(runner, root, tmp_path / "layout")
    push_policy = tmp_path / "push-policy.json"
    push_policy.write_text(json.dumps(owner_push_policy()))
    reference = f"{published.registry.address}/hfl-lab/workload:unsigned"
    runner.run("push", ["skopeo", "copy", "--quiet", "--policy", str(push_policy),
                        "--dest-cert-dir", str(published.registry.cert_dir),
                        other.reference, f"docker://{reference}"])
    source = ImageSource(reference, "", published.image.source.policy_path,
                         published.image.source.registries_d, published.image.source.cert_dir)

    # Act / Assert
    with pytest.raises(ImageRefused, match=r"worker0 refused .* no signature") as refused:
        pull_image(source, published.key.private_pem(), tmp_path / "worker0", who="worker0")
    assert not (tmp_path / "worker0").exists()
    assert refused.value.fix


def test_a_pull_of_an_image_whose_layer_was_modified_after_signing_is_refused(
    own_image: Published, tmp_path: Path
) -> None:
    # Arrange: the registry's storage admin changes one byte of the signed (encrypted) layer
    layer = own_image.image.encrypted.layers[0].digest.split(":")[1]
    blob = next((own_image.registry.folder / "storage").rglob(f"sha256/{layer[:2]}/{layer}/data"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    # Act / Assert
    with pytest.raises(ImageRefused, match="modified after signing"):
        pull_image(own_image.image.source, own_image.key.private_pem(), tmp_path / "ps0",
                   who="ps0")
    assert not (tmp_path / "ps0").exists()


def test_a_pull_with_another_key_is_refused(published: Published, tmp_path: Path) -> None:
    with pytest.raises(ImageRefused, match="does not decrypt"):
        pull_image(published.image.source, LayerKey().private_pem(), tmp_path / "ps0",
                   who="ps0")


def test_the_layer_key_is_released_to_attested_participants_only(
    published: Published, tmp_path: Path
) -> None:
    # Arrange: the owner registers the private half for ps0 and worker0, each pinned
    running = start(tmp_path)
    release = image_release_policy(
        {"ps0": measured("ps0"), "worker0": measured("worker0")},
        base=AttestationPolicy.from_dict({"allow_simulated": True}))
    other_code = measure_workload(role="worker0")
    other_code.mr_td = b"\x42" * 48
    try:
        with connect(running) as client:
            register_layer_key(client, published.key, release, running.admin)

            # Act: an attested worker asks; then TDs that are not what the policy names, and
            # a client with no evidence at all
            released = obtain_layer_key(client, "worker0", provider("worker0"))
            refusals = []
            for role, td in [("worker0", provider("worker0", other_code)),
                             ("worker0", provider("worker0", debug=True)),
                             ("ps0", provider("worker0")),
                             ("worker1", provider("worker0"))]:
                with pytest.raises(ImageRefused, match="did not release") as refused:
                    obtain_layer_key(client, role, td)
                refusals.append(str(refused.value))
            nonce = client.stub.GetChallenge(pb.ChallengeRequest(role="worker0")).nonce
            with pytest.raises(grpc.RpcError) as bare:  # a key of its own, but no TD
                client.stub.ReleaseSecret(pb.ReleaseRequest(
                    app_id=IMAGE_APP_ID, name=LAYER_KEY_NAME, role="worker0", nonce=nonce,
                    public_key=RaTlsIdentity().spki_der, evidence_json="{}"))
    finally:
        running.server.stop(0)

    # Assert: the attested worker's key decrypts the image; nobody else got anything
    assert released == published.key.private_pem()
    pulled = pull_image(published.image.source, released, tmp_path / "worker0", who="worker0")
    assert (pulled.workload_root / "trainer" / "__main__.py").is_file()
    assert running.service.broker.released == 1
    assert len(refusals) == 4
    assert bare.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                 grpc.StatusCode.INVALID_ARGUMENT)
    assert all(released.decode() not in text for text in refusals)


def test_no_private_key_in_any_file_of_the_run_folder(own_image: Published,
                                                      tmp_path: Path) -> None:
    # Arrange: publish (own_image) and a participant's pull, both done
    before = _signer_homes()
    pull_image(own_image.image.source, own_image.key.private_pem(), tmp_path / "image-ps0",
               who="ps0")
    own_image.registry.close()
    layer_key = own_image.key.private_pem()
    body = b"".join(layer_key.splitlines()[1:-1])

    # Act: every file the run folder and the participant's folder hold
    files = [p for folder in (own_image.folder, tmp_path / "image-ps0")
             for p in folder.rglob("*") if p.is_file()]
    found = []
    for path in files:
        data = path.read_bytes()
        if body in data or layer_key in data:
            found.append(f"the layer key in {path}")
        found += [f"a private key encoding in {path}"
                  for pattern in PRIVATE_KEY_PATTERNS if pattern.search(data)]

    # Assert: public parts only; the signer's keyring is gone
    assert found == [], found
    assert len(files) > 10
    names = {p.name for p in files}
    assert {"signer.asc", "policy.json", "config.yml", "ca.crt", "layer-key.pub.pem"} <= names
    assert not any("private-keys" in str(p) or p.suffix == ".key" for p in files)
    assert _signer_homes() <= before


def test_a_missing_tool_names_make_system_deps(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(ImageError, match="make system-deps") as missing:
        require_tools()

    assert "skopeo" in str(missing.value) and "umoci" in str(missing.value)
    assert shutil.which("skopeo") is None


def test_notebook_03_report_shows_each_step_with_command_digest_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a run_dir relative to the kernel's folder, as the notebooks' default is in
    # JupyterLab (umoci failed on it: `hfl-lab run` alone makes every path absolute)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    config = LabConfig(run_dir="../run", workers=1)

    # Act
    report = measure_image(config)

    # Assert: every tool step done, with its command, time and digest; layers before/after
    steps = {s.name: s for s in report.steps}
    for name in ("registry", "build", "encrypt", "push and sign", "verify", "pull", "unpack"):
        step = steps[name]
        assert step.status == "done" and step.command and step.seconds is not None, name
        assert step.digest.startswith("sha256:"), name
    assert steps["measure the pulled workload"].status == "done"
    cosign = steps["sign (cosign)"]  # signs where cosign is installed, else prints the command
    assert report.published is not None and report.published.source.digest in cosign.command
    assert cosign.status == ("done" if shutil.which("cosign") else "skipped"), cosign.detail
    assert steps["measure the pulled workload"].digest == "mr_td:" + \
        report.measurements["ps0"].mr_td.hex()
    layers = report.layers_table()
    assert layers is not None
    text = layers.to_text()
    assert PLAIN in text and ENCRYPTED in text
    assert "no container image is built" not in repr(report)
    saved = json.loads((tmp_path / "run" / "image" / "image.json").read_text())
    assert saved["pipeline"]["encrypted"]["media_types"] == [ENCRYPTED]
    assert saved["timings"]["pull_verify_decrypt_unpack_s"] > 0
    assert not (tmp_path / "run" / "image" / "pull-check").exists()


def test_notebook_03_without_the_tools_says_make_system_deps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    report = measure_image(LabConfig(run_dir=str(tmp_path / "run"), workers=1))

    skipped = [s for s in report.steps if s.status == "skipped"]
    assert any("make system-deps" in s.detail for s in skipped)
    assert report.published is None and report.layers_table() is None
    assert report.verdict is not None and report.verdict.accepted


def test_notebook_06_refuses_the_three_image_attacks(tmp_path: Path) -> None:
    # Arrange: a live trust service with the lab's policy, as notebook 06 starts it
    config = LabConfig(run_dir=str(tmp_path / "run"), workers=2)
    trust = LabTrustService.start(config)
    try:
        trust.install_policy()

        # Act
        outcomes = {name: attack(trust) for name, attack in image_attacks().items()}
    finally:
        trust.stop()

    # Assert: each refused by the component that should, with its reason; each a verdict
    assert set(outcomes) == {"unsigned image", "image layer modified after signing",
                             "layer key without attestation"}
    assert all(o.refused for o in outcomes.values()), {n: o.reason for n, o in outcomes.items()}
    assert "no signature" in outcomes["unsigned image"].reason
    assert "modified after signing" in outcomes["image layer modified after signing"].reason
    assert "PERMISSION_DENIED" in outcomes["layer key without attestation"].reason
    subjects = [e.data.get("subject") for e in trust.events if e.kind == "attestation"]
    assert {"unsigned image", "image layer modified after signing",
            "client without attestation (layer key)"} <= set(subjects)


def test_a_pull_from_a_registry_that_is_gone_is_an_error_not_a_refusal(
    own_image: Published, tmp_path: Path
) -> None:
    own_image.registry.close()

    with pytest.raises(ImageError, match="could not pull") as failed:
        pull_image(own_image.image.source, own_image.key.private_pem(), tmp_path / "ps0")

    assert not isinstance(failed.value, ImageRefused)
    assert "registry" in (failed.value.fix or "")


def test_close_returns_once_a_registry_that_is_slow_to_stop_has_stopped(tmp_path: Path) -> None:
    # Arrange: a registry that takes a second to stop once told (a stand-in in front of the
    # real one, first on the runner's PATH), as a registry not yet scheduled may take
    real = shutil.which("docker-registry")
    assert real is not None
    stand_in = tmp_path / "bin" / "docker-registry"
    stand_in.parent.mkdir()
    stand_in.write_text(f'#!/bin/bash\n"{real}" "$@" & child=$!\n'
                        "trap 'kill -TERM $child; wait $child; sleep 1; exit 0' TERM\n"
                        "wait $child\n")
    stand_in.chmod(0o755)
    runner = ToolRunner(env={"PATH": f"{stand_in.parent}:{os.environ['PATH']}"})

    # Act: the block's end closes it
    with serving_registry(tmp_path / "registry", runner) as registry:
        config = str(registry.config_path)
        running = processes_mentioning(config)

    # Assert: close() returned once nothing of the registry was left
    assert any(str(stand_in) in line for _, line in running), running
    assert processes_mentioning(config) == []


def test_the_registry_does_not_outlive_its_owner_killed_with_sigkill(tmp_path: Path) -> None:
    # Arrange: a process that starts the run's registry, then is killed (no teardown runs)
    script = ("import sys, time; from pathlib import Path; "
              "from hfl_lab.image import LabRegistry, ToolRunner; "
              f"r = LabRegistry(Path({str(tmp_path / 'registry')!r}), ToolRunner()).start(); "
              "print('ready', flush=True); time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
    config = str(tmp_path / "registry" / "config.yml")
    assert processes_mentioning(config)

    # Act
    owner.send_signal(signal.SIGKILL)
    owner.wait()

    # Assert: its lifeline closed, the registry stopped by itself (a limit that a busy
    # machine's scheduling of the shell, its kill and the registry's exit stays well within)
    deadline = time.monotonic() + 60
    while processes_mentioning(config) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(config) == []
