"""Image helpers: exact commands, clear refusal without the tools, KBS layout, reference values."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from hfl_lab import BackendError, ConfigError
from hfl_lab.backends.kubernetes import image
from hfl_lab.tee.policy import AttestationPolicy

DIGEST = "sha256:" + "0f" * 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def empty_path(monkeypatch, tmp_path):
    """A PATH with nothing on it: docker, skopeo and cosign are all missing."""
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    ("call", "tool"),
    [
        (lambda tmp: image.build_image("r/x:1", REPO), "docker"),
        (lambda tmp: image.image_digest("r.example.com/x:1"), "skopeo"),
        (lambda tmp: image.encrypt_image("a/b:1", "a/c:1", tmp / "k", "key1", tmp), "skopeo"),
        (lambda tmp: image.sign_image("r.example.com/x", DIGEST, tmp / "cosign.key"), "cosign"),
        (lambda tmp: image.verify_image("r.example.com/x", DIGEST, tmp / "cosign.pub"), "cosign"),
    ],
)
def test_missing_tools_are_refused_with_the_install_step(empty_path, tmp_path, call, tool):
    with pytest.raises(BackendError, match=f"{tool} is not installed.*Fix: install"):
        call(tmp_path)


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_runner_reports_the_command_and_its_failure(monkeypatch, tmp_path):
    fake_tool(tmp_path / "bin", "skopeo", 'echo "$OCICRYPT_KEYPROVIDER_CONFIG $*"\n')
    fake_tool(tmp_path / "bin", "cosign", 'echo "error: no matching signatures" >&2; exit 10\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + "/usr/bin:/bin")
    run = image.encrypt_image(
        "r.example.com/a:1", "r.example.com/a:enc", tmp_path / "k", "key1", tmp_path
    )
    config_path, *argv = run.stdout.split()
    assert json.loads(Path(config_path).read_text()) == image.keyprovider_config()
    assert (
        argv
        == image.encrypt_command(
            "r.example.com/a:1", "r.example.com/a:enc", tmp_path / "k", "key1"
        )[1:]
    )
    with pytest.raises(BackendError, match="exit code 10: error: no matching signatures"):
        image.verify_image("r.example.com/a", DIGEST, tmp_path / "cosign.pub")


def test_command_builders_are_exact(tmp_path):
    assert image.encrypt_command("a/b:1", "a/b:enc", Path("/k/key1"), "key1", insecure=True) == [
        "skopeo",
        "copy",
        "--insecure-policy",
        "--encryption-key",
        "provider:attestation-agent:keypath=/k/key1::keyid=kbs:///default/image_key/key1::algorithm=A256GCM",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "docker://a/b:1",
        "docker://a/b:enc",
    ]
    assert image.sign_command("r/x", DIGEST, Path("c.key"))[-1] == f"r/x@{DIGEST}"
    assert image.verify_command("r/x", DIGEST, Path("c.pub"))[:2] == ["cosign", "verify"]
    assert image.build_command("t", REPO)[:4] == [
        "docker",
        "build",
        "-f",
        str(REPO / "native/image/Dockerfile"),
    ]
    assert image.digest_command("r/x:1", insecure=True)[-2:] == [
        "--tls-verify=false",
        "docker://r/x:1",
    ]
    with pytest.raises(ConfigError, match="digest"):
        image.sign_command("r/x", "latest", Path("c.key"))
    with pytest.raises(ConfigError, match="key id"):
        image.encrypt_command("a", "b", Path("k"), "../etc", insecure=False)


def test_the_signature_policy_refuses_all_but_the_signed_repository():
    policy = image.signature_policy("r.example.com/hfl")
    assert policy["default"] == [{"type": "reject"}]
    assert policy["transports"]["docker"]["r.example.com/hfl"][0]["type"] == "sigstoreSigned"


def test_initdata_digest_is_a_valid_policy_reference_value():
    initdata = image.initdata_toml("http://kbs:8080", "r.example.com/hfl", DIGEST)
    assert DIGEST in initdata
    values = image.initdata_reference_values(initdata)
    assert values["mr_config_id"] == [hashlib.sha384(initdata.encode()).hexdigest()]
    policy = AttestationPolicy.from_dict({**values, "tee_type": "TDX"})
    assert policy.mr_config_id == tuple(values["mr_config_id"])
    other = image.initdata_toml("http://kbs:8080", "r.example.com/hfl", "sha256:" + "1f" * 32)
    assert image.initdata_reference_values(other) != values
