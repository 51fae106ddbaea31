"""The local backend with ``workload_image``: ps0 and the workers pull the encrypted, signed
image with the layer key released to their attested TDs, and run from the unpacked files; a
refused pull stops the participant with one sentence naming the cause (issue 19, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfl_lab import BackendError
from hfl_lab.backends.local import LocalBackend
from hfl_lab.events import LabEvent
from hfl_lab.image import missing_tools
from tests.local_support import processes_mentioning, quick_config

MISSING = missing_tools()
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} for the image pipeline: run "
    "`make system-deps` (Debian: skopeo umoci docker-registry gnupg)")


@pytest.mark.slow
def test_ps_and_workers_run_the_image_they_pulled(tmp_path: Path, cifar_dir: Path) -> None:
    # Arrange
    config = quick_config(tmp_path, cifar_dir, workers=1, steps=6, checkpoint_every=3,
                          vault_size_mb=8, workload_image="on")
    events: list[LabEvent] = []

    # Act
    with LocalBackend(config) as backend:
        result = backend.run_training(on_event=events.append)
        registry = backend.registry
        assert registry is not None and registry.running
        document = json.loads(json.dumps(backend.published_image.to_dict()))  # type: ignore[union-attr]
    participants = Path(config.run_dir) / "image" / "participants"

    # Assert: both pulled (the trust service did not), and each ran from its unpacked files:
    # the gRPC stubs were generated there from the image's .proto when the code imported them
    assert result.final_step == 6 and result.exit_codes["ps0"] == 0
    pulled = {e.source for e in events
              if e.kind == "log" and "pulled" in str(e.data.get("message", ""))}
    assert pulled == {"ps0", "worker0"}
    for role in ("ps0", "worker0"):
        app = participants / role / "bundle" / "rootfs" / "app"
        assert (app / "trainer" / "proto" / "parameter_server_pb2.py").is_file(), role
    assert not (participants / "trust").exists()
    registered = [e for e in events if e.source == "owner"
                  and "layer key is registered" in str(e.data.get("message", ""))]
    assert len(registered) == 1
    assert document["encrypted"]["media_types"][0].endswith("+encrypted")
    assert not registry.running
    assert not processes_mentioning(str(registry.config_path))


@pytest.mark.parametrize("attack", ["layer modified after signing", "policy swapped"])
def test_a_refused_pull_stops_the_participant_naming_the_cause(
    tmp_path: Path, cifar_dir: Path, attack: str
) -> None:
    # Arrange: the image is published; then the host changes what the participants will read
    config = quick_config(tmp_path, cifar_dir, workers=1, vault=False, workload_image="on")
    with LocalBackend(config) as backend:
        backend.prepare()
        image = backend.published_image
        assert image is not None
        if attack == "policy swapped":  # a policy accepting anything, in the owner's file
            image.source.policy_path.write_text(
                json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        else:
            digest = image.encrypted.layers[0].digest.split(":")[1]
            assert backend.registry is not None
            blob = next((backend.registry.folder / "storage").rglob(f"{digest}/data"))
            data = bytearray(blob.read_bytes())
            data[-100] ^= 0x01
            blob.write_bytes(bytes(data))

        # Act
        with pytest.raises(BackendError) as stopped:
            backend.start()
            backend.wait_ready(120)

    # Assert: the participant exited before it ran anything, its reason in one sentence
    text = str(stopped.value)
    cause = ("a layer is not the one the signed manifest names" if attack.startswith("layer")
             else "not the one the owner wrote")
    assert cause in text, text
    assert "refused the image" in text
    assert not (Path(config.run_dir) / "image" / "participants" / "ps0" / "bundle").exists()


@pytest.mark.parametrize(("choice", "ok"), [("on", False), ("auto", True), ("off", True)])
def test_preflight_names_the_image_tools_and_fails_only_when_the_run_needs_them(
    tmp_path: Path, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch, choice: str, ok: bool
) -> None:
    config = quick_config(tmp_path, cifar_dir, workload_image=choice)
    backend = LocalBackend(config)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    (check,) = [c for c in backend.preflight() if c.name == "image tools"]

    assert check.ok is ok
    assert "missing umoci, skopeo" in check.detail and "make system-deps" in check.fix
    backend.teardown()
