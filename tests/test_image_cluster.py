"""The cluster's participant image (issue 19, items 1 and 4): native/image/Dockerfile built by
buildah or docker, then the same steps as the local image into the user's registry; the layer
key registered in the run's trust service for ps0 and the workers; cosign beside GPG.

What is skipped here and why: this machine has no buildah and no Docker daemon, and tests have
no network (a build of native/image/Dockerfile pip-installs TensorFlow), so the full build runs
only where ``HFL_LAB_BUILD_IMAGE=1`` and a builder works. Everything after the build is tested
on an image umoci builds (the plain OCI layout the builder would leave), pushed to a real
``docker-registry`` standing in for the user's registry. cosign is not installed here either:
its refusal, the command it prints and the policy it would write are tested; the signing itself
runs only where cosign is installed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab import BackendError, ImageError, ImageRefused
from hfl_lab.backends.kubernetes import provision
from hfl_lab.backends.kubernetes.render import render_run
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.backends.kubernetes.workload_image import (
    cluster_registry,
    cluster_release_policy,
    pinned_settings,
    publish_cluster_image,
)
from hfl_lab.image import (
    LabRegistry,
    LayerKey,
    PublishedImage,
    ToolRunner,
    missing_tools,
    obtain_layer_key,
    pull_image,
    read_image,
)
from hfl_lab.image.container import (
    build_commands,
    build_container_image,
    builder_status,
    find_builder,
)
from hfl_lab.image.cosign import (
    command_line,
    cosign_sign,
    pinned_reference,
    require_cosign,
    sigstore_policy,
    sigstore_registries_d,
)
from hfl_lab.image.layout import build_workload_image
from hfl_lab.image.publish import publish_image
from hfl_lab.lab.image import cosign_step
from hfl_lab.tee import measure_workload
from tests.image_support import serving_registry
from tests.secret_support import PRIVATE_KEY_PATTERNS
from tests.td_support import PLATFORM, lab_policy, provider
from tests.trust_support import connect, start

REPO = Path(__file__).resolve().parents[1]
MISSING = missing_tools()
needs_pipeline = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} for the image pipeline: run "
    "`make system-deps` (Debian: skopeo umoci docker-registry gnupg)")
ENCRYPTED = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"


# -- building with buildah or docker: the command lines and the refusal ------------------------


def test_build_commands_run_the_dockerfile_with_buildah_or_docker(tmp_path: Path) -> None:
    layout = tmp_path / "image" / "build"

    buildah = build_commands("buildah", REPO, layout, "workload")
    docker = build_commands("docker", REPO, layout, "workload", tmp_path / "work")

    dockerfile = str(REPO / "native/image/Dockerfile")
    assert [step for step, _ in buildah] == ["build: image", "build"]
    assert buildah[0][1][:2] == ["buildah", "build"] and dockerfile in buildah[0][1]
    assert buildah[0][1][-1] == str(REPO)  # the context: the repository's root
    assert buildah[1][1][-1] == f"oci:{layout}:workload"
    assert [argv[0] for _, argv in docker] == ["docker", "docker", "skopeo"]
    archive = str(tmp_path / "work" / "workload.docker.tar")
    assert docker[1][1] == ["docker", "save", "--output", archive, docker[0][1][5]]
    assert docker[2][1][-2:] == [f"docker-archive:{archive}", f"oci:{layout}:workload"]
    with pytest.raises(ImageError, match="not an image builder"):
        build_commands("podman", REPO, layout)


def test_without_buildah_or_a_docker_daemon_the_build_is_refused_naming_the_fix() -> None:
    # Arrange: nothing installed; then a docker client whose daemon does not answer (this
    # machine's case)
    def nothing(_: str) -> str | None:
        return None

    def client_only(name: str) -> str | None:
        return "/usr/bin/docker" if name == "docker" else None

    # Act
    with pytest.raises(ImageError) as none:
        find_builder(nothing, lambda: True)
    with pytest.raises(ImageError) as no_daemon:
        find_builder(client_only, lambda: False)

    # Assert: one sentence naming what was found, the fix names both builders
    assert "buildah: not installed; docker: not installed" in none.value.message
    assert "docker: client only: its daemon does not answer" in no_daemon.value.message
    for error in (none.value, no_daemon.value):
        assert error.fix is not None and "buildah" in error.fix and "Docker Engine" in error.fix
    assert find_builder(client_only, lambda: True) == "docker"
    assert find_builder(lambda n: f"/usr/bin/{n}", lambda: False) == "buildah"


def test_a_build_with_no_builder_here_is_refused_before_anything_runs(tmp_path: Path) -> None:
    if any(state == "usable" for state in builder_status().values()):
        pytest.skip("a builder works here: the refusal is tested with injected tools above")
    runner = ToolRunner()

    with pytest.raises(ImageError, match="needs buildah or docker"):
        build_container_image(runner, REPO, tmp_path / "build")

    assert runner.records == [] and not (tmp_path / "build").exists()


@pytest.mark.skipif(os.environ.get("HFL_LAB_BUILD_IMAGE") != "1",
                    reason="the full build of native/image/Dockerfile needs buildah or a Docker "
                    "daemon and the network (pip); set HFL_LAB_BUILD_IMAGE=1 where both are")
def test_the_full_image_builds_where_a_builder_works(tmp_path: Path) -> None:
    runner = ToolRunner(timeout_s=3600)

    image = build_container_image(runner, REPO, tmp_path / "build")

    assert image.layers and image.config["config"]["Entrypoint"] == ["/opt/hfl-lab/entrypoint.sh"]
    assert runner.records[-1].step == "build" and runner.records[-1].digest.startswith("sha256:")


# -- the rest of the pipeline, on an image umoci builds, into "the user's registry" ------------


@dataclass
class ClusterImage:
    folder: Path
    registry: LabRegistry
    settings: KubernetesSettings
    key: LayerKey
    image: PublishedImage
    runner: ToolRunner


@pytest.fixture(scope="module")
def cluster_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterImage]:
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)}: run `make system-deps`")
    folder = tmp_path_factory.mktemp("run") / "image"
    runner = ToolRunner()
    with serving_registry(folder.parent / "users-registry", runner) as registry:
        settings = KubernetesSettings(
            overlay="kata-qemu-tdx-encrypted-signed", workers=2,
            image=f"{registry.address}/team-a/hfl-lab:0.2.0",
            run_dir=folder.parent / "k8s", image_dir=folder)
        key = LayerKey()
        # what buildah or docker leaves: a plain OCI layout (here made by umoci)
        plain = build_workload_image(runner, REPO, folder / "build", "workload")
        target = cluster_registry(settings, folder, ca_file=registry.cert_dir / "ca.crt")
        image = publish_image(folder, plain, target, key.public_pem, runner=runner,
                              repository=settings.image_ref.repository, tag="0.2.0")
        yield ClusterImage(folder, registry, settings, key, image, runner)


def test_the_image_goes_encrypted_and_signed_to_the_users_registry(
    cluster_image: ClusterImage, tmp_path: Path,
) -> None:
    # Arrange
    source = cluster_image.image.source
    policy = json.loads(source.policy_path.read_text())

    # Act: a participant's pull through the written policy, with the layer key
    pulled = pull_image(source, cluster_image.key.private_pem(), tmp_path / "ps0", who="ps0")

    # Assert: the user's repository and tag, encrypted layers only, the policy names that
    # repository; the CA the user gave is the one the pushes were checked with
    address = cluster_image.registry.address
    assert source.reference == f"{address}/team-a/hfl-lab:0.2.0"
    assert list(policy["transports"]["docker"]) == [f"{address}/team-a/hfl-lab"]
    assert read_image(Path(cluster_image.image.files["oci"]), "workload").media_types == [
        ENCRYPTED]
    push = next(r for r in cluster_image.runner.records if r.step == "push and sign")
    assert str(cluster_image.folder / "certs.d") in push.argv
    assert (cluster_image.folder / "certs.d" / "ca.crt").read_bytes() == (
        cluster_image.registry.cert_dir / "ca.crt").read_bytes()
    assert (pulled.workload_root / "trainer" / "__main__.py").is_file()
    assert not (cluster_image.folder / "build").exists()  # the plain image left
    with pytest.raises(ImageRefused, match="does not decrypt"):
        pull_image(source, LayerKey().private_pem(), tmp_path / "w", who="worker0")


def test_no_private_key_of_the_cluster_pipeline_in_any_file_of_its_folder(
    cluster_image: ClusterImage,
) -> None:
    # Arrange: the layer key's private half, in the forms it could be written in
    layer_key = cluster_image.key.private_pem()
    body = b"".join(layer_key.splitlines()[1:-1])

    # Act: every file of the run's image/ folder
    files = [p for p in cluster_image.folder.rglob("*") if p.is_file()]
    found = [str(p) for p in files if body in p.read_bytes()]
    found += [f"{pattern.pattern!r} in {p}" for p in files
              for pattern in PRIVATE_KEY_PATTERNS if pattern.search(p.read_bytes())]

    # Assert: public parts only (the plain image and the builder's work folder are gone)
    assert found == [], found
    names = {p.name for p in files}
    assert {"policy.json", "signer.asc", "layer-key.pub.pem", "pipeline.json", "ca.crt"} <= names
    assert not any(p.suffix in (".key", ".tar") for p in files)


def test_the_run_is_pinned_to_the_signed_digest_and_the_overlay_carries_the_policy(
    cluster_image: ClusterImage,
) -> None:
    # Arrange
    settings = pinned_settings(cluster_image.settings, cluster_image.image)

    # Act
    run = render_run(settings)

    # Assert: every pod runs the user's image by digest, the initdata pins that digest, the
    # hfl-image ConfigMap holds the run's own signature policy and says where the key is
    digest = cluster_image.image.source.digest
    images = {c["image"] for o in run.objects if o["kind"] == "StatefulSet"
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {f"{cluster_image.registry.address}/team-a/hfl-lab@{digest}"}
    assert all(digest in text for text in run.initdata.values())
    (config_map,) = [o for o in run.objects
                     if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "hfl-image"]
    data = config_map["data"]
    assert data["policy.json"] == cluster_image.image.source.policy_path.read_text()
    assert data["signer.asc"].startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert f"@{digest}" in data["image.yaml"] and "kbs:///default/image_key/hfl-lab" in (
        data["image.yaml"])
    assert "hfl-lab-image/workload-layers" in data["image.yaml"]


def test_the_layer_key_is_registered_for_the_runs_participants_and_released_to_them_only(
    cluster_image: ClusterImage, tmp_path: Path,
) -> None:
    # Arrange: a runc run of the published image (simulated TDs, so the derived policy pins
    # each role's MR_TD and MR_CONFIG_ID) and a live trust service
    settings = pinned_settings(cluster_image.settings, cluster_image.image)
    run = render_run(KubernetesSettings(overlay="runc", workers=2, image=settings.image,
                                        run_dir=tmp_path / "k8s"))
    release = cluster_release_policy(run)
    as_pod = {role: measure_workload(role=role, config=run.document, argv=run.commands[role],
                                     root=REPO) for role in ("ps0", "worker0", "worker1")}
    running = start(tmp_path)
    try:
        # Act: the owner registers over a verified channel; then the pods ask
        provision.register_layer_key(running.address, lab_policy(), running.admin,
                                     cluster_image.key, release, lab_root_der=PLATFORM.root_der)
        with connect(running) as client:
            released = obtain_layer_key(client, "worker1", provider("worker1", as_pod["worker1"]))
            with pytest.raises(ImageRefused, match="did not release"):  # ps0's TD as worker0
                obtain_layer_key(client, "worker0", provider("worker0", as_pod["ps0"]))
            with pytest.raises(ImageRefused, match="did not release"):  # not the pod's code
                obtain_layer_key(client, "worker0", provider("worker0"))
        with pytest.raises(BackendError, match="refused the image's layer key"):
            provision.register_layer_key(running.address, lab_policy(), os.urandom(32),
                                         cluster_image.key, release,
                                         lab_root_der=PLATFORM.root_der)
    finally:
        running.server.stop(0)

    # Assert: the release policy names exactly the run's participants; the released key
    # decrypts the image
    assert sorted(release.roles) == ["ps0", "worker0", "worker1"]
    assert release.report_data_binding == "key+nonce" and not release.allow_debug
    assert released == cluster_image.key.private_pem()
    pulled = pull_image(cluster_image.image.source, released, tmp_path / "w1", who="worker1")
    assert pulled.image.layers


def test_on_real_tds_the_layer_key_needs_a_policy_pinning_every_participant(
    tmp_path: Path,
) -> None:
    run = render_run(KubernetesSettings(overlay="kata-qemu-tdx", run_dir=tmp_path))

    with pytest.raises(BackendError, match="mr_td") as open_td:
        cluster_release_policy(run)

    assert open_td.value.fix is not None and "policy_path" in open_td.value.fix


def test_the_users_registry_must_be_named(tmp_path: Path) -> None:
    settings = KubernetesSettings(image="hfl-lab:0.1.0")

    with pytest.raises(BackendError, match="names no registry"):
        publish_cluster_image(settings, tmp_path, LayerKey())


# -- cosign -----------------------------------------------------------------------------------


def _cosign_public_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_the_sigstore_policy_names_the_repository_and_embeds_the_key() -> None:
    public = _cosign_public_key()

    policy = sigstore_policy("registry.example.com:5000/team-a/hfl-lab", public)

    assert policy["default"] == [{"type": "reject"}]
    (rule,) = policy["transports"]["docker"]["registry.example.com:5000/team-a/hfl-lab"]
    assert rule["type"] == "sigstoreSigned"
    assert base64.b64decode(rule["keyData"]) == public
    assert rule["signedIdentity"] == {"type": "matchRepository"}
    assert "use-sigstore-attachments: true" in sigstore_registries_d("registry.example.com:5000")
    with pytest.raises(ImageError, match="not a PEM public key"):
        sigstore_policy("r/x", b"-----BEGIN PRIVATE KEY-----")


def test_cosign_signs_a_digest_never_a_tag() -> None:
    digest = "sha256:" + "ab" * 32

    assert pinned_reference("127.0.0.1:5000/team/hfl-lab:0.2.0", digest) == (
        f"127.0.0.1:5000/team/hfl-lab@{digest}")
    assert pinned_reference("127.0.0.1:5000/hfl", digest) == f"127.0.0.1:5000/hfl@{digest}"
    line = command_line(f"r.example.com/hfl@{digest}", Path("image/cosign.pub"))
    assert f"cosign sign --yes --tlog-upload=false --key cosign.key r.example.com/hfl@{digest}" in (
        line)
    assert "cosign verify --insecure-ignore-tlog=true --key image/cosign.pub" in line
    with pytest.raises(ImageError, match="not an image digest"):
        pinned_reference("r.example.com/hfl:1", "latest")


def test_without_cosign_the_step_says_so_and_prints_the_exact_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cluster_image: ClusterImage,
) -> None:
    # Arrange: a PATH with no cosign on it
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    pinned = pinned_reference(cluster_image.image.source.reference,
                              cluster_image.image.source.digest)

    # Act
    with pytest.raises(ImageError) as refused:
        require_cosign(pinned, cluster_image.folder)
    (step,) = cosign_step(cluster_image.image, cluster_image.folder)

    # Assert: the step is skipped, says why, and its command is the one a person runs
    assert "cosign is not installed here" in refused.value.message
    assert refused.value.fix is not None and "docs.sigstore.dev" in refused.value.fix
    assert f"cosign sign --yes --tlog-upload=false --key cosign.key {pinned}" in (
        refused.value.message)
    assert step.status == "skipped" and "cosign is not installed here" in step.detail
    assert step.command == command_line(pinned, cluster_image.folder / "cosign.pub")
    assert not (cluster_image.folder / "policy-sigstore.json").exists()


@needs_pipeline
def test_skopeo_enforces_the_sigstore_policy_it_would_write(
    cluster_image: ClusterImage, tmp_path: Path,
) -> None:
    # Arrange: the policy cosign's step writes, for a key that signed nothing here
    source = cluster_image.image.source
    repository = source.reference.rsplit(":", 1)[0]
    policy = tmp_path / "policy-sigstore.json"
    policy.write_text(json.dumps(sigstore_policy(repository, _cosign_public_key())))
    registries_d = tmp_path / "registries.d"
    registries_d.mkdir()
    (registries_d / "r.yaml").write_text(sigstore_registries_d(cluster_image.registry.address))

    # Act: the GPG-signed image pulled through it
    result = subprocess.run(
        ["skopeo", "copy", "--quiet", "--policy", str(policy), "--registries.d",
         str(registries_d), "--src-cert-dir", str(source.cert_dir),
         f"docker://{source.reference}", f"oci:{tmp_path / 'oci'}:x"],
        capture_output=True, text=True, timeout=120, check=False)

    # Assert: refused, as it carries no cosign signature by that key
    assert result.returncode != 0
    assert "a signature was required, but no signature exists" in result.stderr.lower(), (
        result.stderr)


@pytest.mark.skipif(shutil.which("cosign") is None,
                    reason="cosign is not installed here: the refusal and the policy document "
                    "are tested above; the signing runs where cosign is")
def test_where_cosign_is_installed_it_signs_and_skopeo_verifies(
    cluster_image: ClusterImage, tmp_path: Path,
) -> None:
    runner = ToolRunner()

    signature = cosign_sign(cluster_image.image, cluster_image.folder, runner)

    source = cluster_image.image.source
    result = subprocess.run(
        ["skopeo", "copy", "--quiet", "--policy", str(signature.policy), "--registries.d",
         str(signature.registries_d), "--src-cert-dir", str(source.cert_dir),
         f"docker://{source.reference}", f"oci:{tmp_path / 'oci'}:x"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert [r.step for r in runner.records] == ["cosign: key", "sign (cosign)", "verify (cosign)"]
    assert not any(p.name.endswith(".key") for p in cluster_image.folder.rglob("*"))
