"""Rendered manifests: schema-valid for every overlay and worker count, and what they promise."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hfl_lab import ConfigError, LabConfig
from hfl_lab.backends.kubernetes import kustomize
from hfl_lab.backends.kubernetes.kustomize import apply_patch
from hfl_lab.backends.kubernetes.preflight import check_image_tools
from hfl_lab.backends.kubernetes.render import K8S_DIR, config_document, render, render_run
from hfl_lab.backends.kubernetes.settings import OVERLAYS, ContainerResources, KubernetesSettings
from hfl_lab.backends.local.preflight import local_checks
from hfl_lab.image.signing import signature_policy
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import measure_workload
from trainer.participant_config import ParticipantConfig

REPO = Path(__file__).resolve().parents[1]

#: the Kubernetes version whose OpenAPI schemas the manifests must satisfy
#: (schemas shipped with kubernetes-validate 1.37.0)
K8S_SCHEMA_VERSION = "1.37.0"


def by_kind(objects, kind, name=None):
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert found, (kind, name)
    return found if name is None else found[0]


def pod(objects, name):
    return by_kind(objects, "StatefulSet", name)["spec"]["template"]["spec"]


@pytest.mark.parametrize("workers", [1, 2, 8])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_the_openapi_schema(tmp_path, overlay, workers):
    settings = KubernetesSettings(
        overlay=overlay, workers=workers, namespace="hfl-x", run_dir=tmp_path
    )
    objects = render(settings)
    assert len(objects) >= 12
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_SCHEMA_VERSION, strict=True)
    assert by_kind(objects, "StatefulSet", "worker")["spec"]["replicas"] == workers
    assert all(
        o["metadata"].get("namespace") == "hfl-x" for o in objects if o["kind"] != "Namespace"
    )
    assert by_kind(objects, "Namespace")[0]["metadata"]["name"] == "hfl-x"


def test_validation_would_catch_a_broken_manifest(tmp_path):
    sts = by_kind(render(KubernetesSettings(run_dir=tmp_path)), "StatefulSet", "ps")
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_SCHEMA_VERSION, strict=True)


def test_runtime_class_and_privileges_per_overlay(tmp_path):
    runc = render(KubernetesSettings(overlay="runc", run_dir=tmp_path / "a"))
    tdx = render(KubernetesSettings(overlay="kata-qemu-tdx", run_dir=tmp_path / "b"))
    for name in ("trust", "ps", "worker"):
        assert "runtimeClassName" not in pod(runc, name)
        assert pod(tdx, name)["runtimeClassName"] == "kata-qemu-tdx"
    for objects in (runc, tdx):
        for name in ("trust", "worker"):
            sc = pod(objects, name)["containers"][0]["securityContext"]
            assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
    assert not pod(runc, "ps")["containers"][0]["securityContext"].get("privileged")
    assert pod(runc, "ps")["securityContext"]["runAsNonRoot"] is True
    # only the ps container under kata, for the LUKS kernel path
    assert pod(tdx, "ps")["containers"][0]["securityContext"]["privileged"] is True
    env = {e["name"]: e.get("value") for e in pod(tdx, "ps")["containers"][0]["env"]}
    assert env["HFL_LAB_VAULT_DATA_PATH"] == "kernel" and env["HFL_LAB_EVIDENCE"] == "configfs-tsm"
    for objects in (runc, tdx):  # one participant per pod, no placeholder containers
        for name in ("trust", "ps", "worker"):
            (container,) = pod(objects, name)["containers"]
            assert container["command"] == ["/opt/hfl-lab/entrypoint.sh"]
            assert container["args"][:2] == ["python", "-m"]


def test_parameters_reach_the_objects(tmp_path):
    settings = KubernetesSettings(
        overlay="kata-qemu-tdx-encrypted-signed",
        workers=3,
        namespace="team-a",
        image="reg.example.com:5000/lab/hfl@sha256:" + "ab" * 32,
        data_source="pvc:cifar10",
        policy_yaml="tee_type: TDX\nmr_td: any\n",
        kbs_url="http://10.1.2.3:8080",
        worker_resources=ContainerResources("3", "4", "6Gi", "8Gi"),
        lab_config={"epochs": 2},
        run_dir=tmp_path,
    )
    objects = render(settings)
    images = {
        c["image"]
        for o in objects
        if o["kind"] == "StatefulSet"
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert images == {settings.image}
    worker = pod(objects, "worker")
    assert {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "cifar10", "readOnly": True},
    } in worker["volumes"]
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert (
        by_kind(objects, "ConfigMap", "hfl-policy")["data"]["policy.yaml"] == settings.policy_yaml
    )
    config = yaml.safe_load(by_kind(objects, "ConfigMap", "hfl-config")["data"]["config.yaml"])
    assert config == config_document(settings)
    assert config["deployment"]["ps_address"] == "ps0.team-a.svc:50051"
    assert config["lab"]["epochs"] == 2 and config["lab"]["workers"] == 3
    assert config["lab"]["data_path"] == "/data" and config["lab"]["kubeconfig"] is None
    data = {"name": "data", "persistentVolumeClaim": {"claimName": "cifar10", "readOnly": True}}
    assert data in pod(objects, "ps")["volumes"]
    annotations = by_kind(objects, "StatefulSet", "ps")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert (
        "cc_kbc::http://10.1.2.3:8080"
        in annotations["io.katacontainers.config.hypervisor.kernel_params"]
    )


def test_config_map_is_the_participant_config_the_services_promise(tmp_path):
    objects = render(KubernetesSettings(namespace="lab-c", workers=2, run_dir=tmp_path,
                                        lab_config={"steps": 7, "vault": True}))
    text = by_kind(objects, "ConfigMap", "hfl-config")["data"]["config.yaml"]
    config = ParticipantConfig.from_document(yaml.safe_load(text))
    ports = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"]
             for s in by_kind(objects, "Service")}
    d = config.deployment
    assert d.trust_address == f"trust.lab-c.svc:{ports['trust']}"
    assert d.ps_address == f"ps0.lab-c.svc:{ports['ps0']}"
    assert (d.evidence, d.workers, config.lab.workers, config.lab.steps) == ("simulated", 2, 2, 7)
    ps = pod(objects, "ps")["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in ps["volumeMounts"]}
    assert d.vault_path.startswith(mounts["vault"] + "/") and d.data_dir == mounts["data"]
    assert d.policy_path.startswith(mounts["policy"] + "/")
    trust_args = pod(objects, "trust")["containers"][0]["args"]
    assert trust_args[trust_args.index("--port") + 1] == str(ports["trust"])
    assert trust_args[trust_args.index("--config") + 1] == mounts["config"]


def test_runc_policy_is_derived_from_the_rendered_document_and_argv(tmp_path):
    run = render_run(KubernetesSettings(workers=2, run_dir=tmp_path))
    policy_text = by_kind(run.objects, "ConfigMap", "hfl-policy")["data"]["policy.yaml"]
    policy = AttestationPolicy.from_dict(yaml.safe_load(policy_text))
    config_map = by_kind(run.objects, "ConfigMap", "hfl-config")
    document = yaml.safe_load(config_map["data"]["config.yaml"])
    worker = pod(run.objects, "worker")["containers"][0]
    args = {
        "trust": pod(run.objects, "trust")["containers"][0]["args"],
        "ps0": pod(run.objects, "ps")["containers"][0]["args"],
        "worker1": [a.replace("$(HFL_LAB_WORKER_INDEX)", "1") for a in worker["args"]],
    }
    assert policy.allow_simulated and not policy.allow_debug
    for role, argv in args.items():
        m = measure_workload(role=role, config=document, argv=argv, root=REPO)
        assert policy.reference_for(role, "mr_config_id") == (m.mr_config_id.hex(),)
        assert m.mr_td.hex() in (policy.mr_td or ())
    assert policy.reference_for("worker0", "mr_config_id") != policy.reference_for(
        "worker1", "mr_config_id")


def test_tdx_policies_refuse_simulated_evidence_and_pin_the_initdata(tmp_path):
    plain = render_run(KubernetesSettings(overlay="kata-qemu-tdx", run_dir=tmp_path / "a"))
    # no value every role shares: each role is pinned to its own initdata (issue 18, item 1)
    assert not plain.policy.allow_simulated and plain.policy.mr_config_id is None
    digest = "sha256:" + "cd" * 32
    signed = render_run(KubernetesSettings(overlay="kata-qemu-tdx-encrypted-signed",
                                           image=f"r.example.com/hfl@{digest}",
                                           run_dir=tmp_path / "b"))
    annotations = by_kind(signed.objects, "StatefulSet", "worker")["spec"]["template"]["metadata"][
        "annotations"]
    initdata = gzip.decompress(
        base64.b64decode(annotations["io.katacontainers.config.hypervisor.cc_init_data"]))
    assert digest.encode() in initdata
    assert signed.policy.reference_for("worker1", "mr_config_id") == (
        hashlib.sha384(initdata).hexdigest(),)
    assert not signed.policy.allow_simulated and signed.policy.report_data_binding == "key+nonce"


def test_mount_root_moves_every_lab_path_and_nothing_else(tmp_path):
    root = str(tmp_path / "pods")
    objects = render(KubernetesSettings(mount_root=root, service_host="127.0.0.9",
                                        run_dir=tmp_path / "k8s"))
    document = yaml.safe_load(by_kind(objects, "ConfigMap", "hfl-config")["data"]["config.yaml"])
    d = document["deployment"]
    assert d["trust_address"] == "127.0.0.9:50060" and d["vault_path"] == root + "/vault/model.luks"
    assert document["lab"]["data_path"] == root + "/data"
    for name in ("trust", "ps", "worker"):
        container = pod(objects, name)["containers"][0]
        assert all(m["mountPath"].startswith(root + "/") or m["mountPath"] == "/tmp"
                   for m in container["volumeMounts"])
        assert container["command"] == ["/opt/hfl-lab/entrypoint.sh"]
        config = container["args"][container["args"].index("--config") + 1]
        assert config == root + "/etc/hfl-lab/config.yaml"
        kubernetes_validate.validate(by_kind(objects, "StatefulSet", name), K8S_SCHEMA_VERSION,
                                     strict=True)


def test_ingress_passes_tls_through_and_network_policy_denies_by_default(tmp_path):
    objects = render(KubernetesSettings(run_dir=tmp_path))
    ingress = by_kind(objects, "Ingress", "hfl-mesh")
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    )
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"]
        == "GRPCS"
    )
    # passthrough routes by SNI; a mesh channel's is the participant name it checks
    # (grpc.ssl_target_name_override), the certificate fetch's the address's host name
    routes = {r["host"]: r["http"]["paths"][0]["backend"]["service"]["name"]
              for r in ingress["spec"]["rules"]}
    assert {h: routes.get(h) for h in ("ps0", "trust")} == {"ps0": "ps0", "trust": "trust"}
    kubernetes_validate.validate(ingress, K8S_SCHEMA_VERSION, strict=True)
    deny = by_kind(objects, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name in ("trust", "ps", "worker"):
        c = pod(objects, name)["containers"][0]
        assert c["resources"]["requests"] and c["resources"]["limits"] and c["readinessProbe"]


def test_committed_overlays_match_kubectl_kustomize_when_available(tmp_path):
    """The sync guarantee: the Python build equals kustomize's for overlays and a run folder."""
    if kustomize_bin := shutil.which("kustomize"):
        cmd = [kustomize_bin, "build"]
    elif kubectl_bin := shutil.which("kubectl"):
        cmd = [kubectl_bin, "kustomize"]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    key = lambda o: (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])  # noqa: E731
    settings = KubernetesSettings(
        overlay="kata-qemu-tdx-encrypted-signed",
        workers=5,
        namespace="z",
        image="r.example.com/x:9",
        data_source="hostpath:/srv/c",
        run_dir=tmp_path,
    )
    render(settings)
    for folder in [K8S_DIR / "overlays" / o for o in OVERLAYS] + [tmp_path]:
        out = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        theirs = {key(o): o for o in yaml.safe_load_all(out.stdout) if o}
        mine = {key(o): o for o in kustomize.build(folder)}
        assert mine == theirs, folder


def test_renderer_refuses_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [../x]\ncommonLabels: {a: b}\n")
    with pytest.raises(ConfigError, match="commonLabels"):
        kustomize.build_builtin(tmp_path)


def test_json_patch_test_op_guards_index_based_overlay_patches():
    doc = {"env": [{"name": "A", "value": "1"}]}
    assert (
        apply_patch(doc, [{"op": "replace", "path": "/env/0/value", "value": "2"}])["env"][0][
            "value"
        ]
        == "2"
    )
    with pytest.raises(ConfigError, match="test failed"):
        apply_patch(doc, [{"op": "test", "path": "/env/0/name", "value": "B"}])
    with pytest.raises(ConfigError, match="out of range"):
        apply_patch(doc, [{"op": "remove", "path": "/env/1"}])
    assert apply_patch(doc, [{"op": "add", "path": "/a~1b", "value": 1}])["a/b"] == 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"workers": 0}, "workers"),
        ({"overlay": "kata"}, "overlay"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"image": "UPPER case"}, "image"),
        ({"data_source": "s3://bucket"}, "data source"),
        ({"data_source": "emptydir"}, "data source"),  # nothing would fill it
        ({"mount_root": "relative/dir"}, "mount_root"),
        ({"service_host": "a host"}, "service_host"),
        ({"policy_yaml": "- a list"}, "policy"),
    ],
)
def test_settings_reject_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        KubernetesSettings(**kw)


def test_settings_from_lab_config(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("tee_type: TDX\nallow_simulated: false\n")
    config = LabConfig(workers=4, namespace="lab-b", image="r.example.com/hfl:2",
                       k8s_overlay="kata-qemu-tdx", kubeconfig="/tmp/kc", data_path="/srv/cifar",
                       policy_path=str(policy), run_dir=str(tmp_path / "run"))

    s = KubernetesSettings.from_config(config)
    assert (s.workers, s.namespace, s.overlay, s.kubeconfig) == (
        4,
        "lab-b",
        "kata-qemu-tdx",
        "/tmp/kc",
    )
    assert s.policy_yaml is not None
    assert s.data_source == "hostpath:/srv/cifar" and "allow_simulated: false" in s.policy_yaml
    assert s.run_dir == tmp_path / "run" / "k8s" and s.lab_config == {
        **config.to_dict(),
        "workers": 4,
        "run_dir": str(tmp_path / "run"),
    }


def args_value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def test_with_the_vault_the_trust_service_makes_the_passphrase_for_ps0_only(tmp_path):
    run = render_run(KubernetesSettings(workers=2, run_dir=tmp_path / "on",
                                        lab_config={"vault": True, "vault_size_mb": 32}))
    trust = pod(run.objects, "trust")
    args = trust["containers"][0]["args"]
    mounts = {m["name"]: m["mountPath"] for m in trust["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in trust["volumes"]}
    policies = by_kind(run.objects, "ConfigMap", "hfl-policy")["data"]
    config_map = by_kind(run.objects, "ConfigMap", "hfl-config")
    document = yaml.safe_load(config_map["data"]["config.yaml"])

    # the sealed state on its own PVC, the release policy next to the run's policy
    assert args_value(args, "--state") == mounts["state"] + "/state.sealed"
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "trust-state"
    assert by_kind(run.objects, "PersistentVolumeClaim", "trust-state")
    assert args_value(args, "--volume-policy") == mounts["policy"] + "/volume_policy.yaml"
    release = AttestationPolicy.from_dict(yaml.safe_load(policies["volume_policy.yaml"]))
    assert release == run.volume_policy and sorted(release.roles) == ["ps0"]
    assert release.reference_for("ps0", "mr_config_id") == run.policy.reference_for(
        "ps0", "mr_config_id")
    assert release.reference_for("worker1", "mr_config_id") == release.reference_for(
        "ps0", "mr_config_id")  # a worker is held to ps0's values, and refused
    assert document["deployment"]["vault_size_mb"] == 32
    # the trust service's argv is measured after the patch: its policy entry still holds
    trust_m = measure_workload(role="trust", config=document, argv=args, root=REPO)
    assert run.policy.reference_for("trust", "mr_config_id") == (trust_m.mr_config_id.hex(),)

    off = render_run(KubernetesSettings(workers=2, run_dir=tmp_path / "off",
                                        lab_config={"vault": False}))
    off_args = pod(off.objects, "trust")["containers"][0]["args"]
    off_doc = yaml.safe_load(by_kind(off.objects, "ConfigMap", "hfl-config")["data"]["config.yaml"])
    assert "--volume-policy" not in off_args and "--state" in off_args
    assert "volume_policy.yaml" not in by_kind(off.objects, "ConfigMap", "hfl-policy")["data"]
    assert off.volume_policy is None and off_doc["deployment"]["vault_size_mb"] == 0


def test_on_real_tds_the_vault_needs_ps0_pinned_by_the_owner(tmp_path):
    plain = render_run(KubernetesSettings(overlay="kata-qemu-tdx", run_dir=tmp_path / "a"))
    assert plain.volume_policy is None
    assert "mr_td" in plain.volume_policy_error and "vault=false" in plain.volume_policy_fix

    pinned = yaml.safe_dump({
        "tee_type": "TDX", "allow_simulated": False, "report_data_binding": "key+nonce",
        "roles": {"ps0": {"mr_td": ["ab" * 48], "mr_config_id": ["cd" * 48]}},
    })
    owned = render_run(KubernetesSettings(overlay="kata-qemu-tdx", run_dir=tmp_path / "b",
                                          policy_yaml=pinned))
    assert owned.volume_policy_error == "" and owned.volume_policy is not None
    assert owned.volume_policy.reference_for("worker0", "mr_td") == ("ab" * 48,)
    assert not owned.volume_policy.allow_simulated


@pytest.mark.parametrize("overlay", [*OVERLAYS, "run"])
def test_the_lab_renderer_prints_what_kustomize_prints(overlay: str, tmp_path: Path) -> None:
    # The lab renders with kustomize where it is installed and with its own renderer of the
    # same subset elsewhere (a machine without kubectl): both must give the same objects.
    from hfl_lab.backends.kubernetes import kustomize

    command = kustomize.kustomize_command()
    if command is None:
        pytest.skip("kustomize is not used here (no kubectl or kustomize installed, or "
                    "HFL_LAB_KUSTOMIZE=builtin): only the lab's renderer runs")
    if overlay == "run":  # a run's own kustomization folder, as the backend writes it
        directory = render_run(KubernetesSettings(run_dir=tmp_path / "k8s")).folder
    else:
        directory = K8S_DIR / "overlays" / overlay

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(kustomize.build_builtin(directory), key=key) == sorted(
        kustomize.build(directory), key=key)


SIGNED = "kata-qemu-tdx-encrypted-signed"
TOOLS = ("skopeo", "umoci", "buildah", "docker", "cosign")


def config_map(objects, name):
    found = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return found[0]["data"] if found else None


def test_the_signed_overlay_points_at_the_image_policy_and_key_and_refuses_until_published(
    tmp_path,
):
    # Arrange: the committed overlay alone, and a run that published nothing yet
    overlay = kustomize.build(K8S_DIR / "overlays" / SIGNED)
    unpublished = render(KubernetesSettings(overlay=SIGNED, run_dir=tmp_path / "k8s",
                                            image_dir=tmp_path / "image"))

    # Assert: the placeholders refuse every image; each pod names the KBS resources of the
    # signature policy, its key and the layer key; no other overlay has the ConfigMap
    for objects in (overlay, unpublished):
        data = config_map(objects, "hfl-image")
        assert json.loads(data["policy.json"]) == {"default": [{"type": "reject"}]}
        assert "kbs:///default/image_key/hfl-lab" in data["image.yaml"]
    for name in ("trust", "ps", "worker"):
        annotations = by_kind(unpublished, "StatefulSet", name)["spec"]["template"]["metadata"][
            "annotations"]
        assert annotations["hfl-lab.io/image-layer-key"] == "kbs:///default/image_key/hfl-lab"
        assert annotations["hfl-lab.io/image-signature-policy"] == (
            "kbs:///default/security-policy/hfl-lab")
    for other in ("runc", "kata-qemu-tdx"):
        assert config_map(render(KubernetesSettings(overlay=other, run_dir=tmp_path / other,
                                                    image_dir=tmp_path / "image")),
                          "hfl-image") is None


def test_a_published_image_reaches_the_signed_overlay_pinned_with_its_policy(tmp_path):
    # Arrange: what the owner's publication left in the run's image/ (public files only)
    image_dir = tmp_path / "image"
    image_dir.mkdir()
    signer = b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nmDMEZ\n-----END PGP PUBLIC KEY BLOCK-----\n"
    policy = json.dumps(signature_policy("reg.example.com:5000/team/hfl", signer), indent=2)
    (image_dir / "policy.json").write_text(policy)
    (image_dir / "signer.asc").write_bytes(signer)
    (image_dir / "layer-key.pub.pem").write_text("not carried")
    digest = "sha256:" + "5e" * 32
    (image_dir / "pipeline.json").write_text(json.dumps({"source": {"digest": digest}}))
    other = render_run(KubernetesSettings(
        overlay=SIGNED, image=f"reg.example.com:5000/team/hfl@sha256:{'77' * 32}",
        run_dir=tmp_path / "other", image_dir=image_dir))
    settings = KubernetesSettings(overlay=SIGNED, image=f"reg.example.com:5000/team/hfl@{digest}",
                                  run_dir=tmp_path / "k8s", image_dir=image_dir, workers=2)

    # Act
    run = render_run(settings)

    # Assert: the user's image by digest in every pod and its initdata; the ConfigMap holds
    # exactly the run's policy and signer and says where the key is; still schema-valid
    data = config_map(run.objects, "hfl-image")
    assert data["policy.json"] == policy and data["signer.asc"] == signer.decode()
    # files of another publication than the deployed digest are not carried
    assert json.loads(config_map(other.objects, "hfl-image")["policy.json"]) == {
        "default": [{"type": "reject"}]}
    assert set(data) == {"image.yaml", "policy.json", "signer.asc"}
    described = yaml.safe_load(data["image.yaml"])
    assert described["reference"] == settings.image
    assert described["layer_key"] == {"trust_service": "hfl-lab-image/workload-layers",
                                      "trustee": "kbs:///default/image_key/hfl-lab"}
    for name in ("trust", "ps", "worker"):
        assert pod(run.objects, name)["containers"][0]["image"] == settings.image
    assert all(digest in text for text in run.initdata.values())
    for obj in run.objects:
        kubernetes_validate.validate(obj, K8S_SCHEMA_VERSION, strict=True)
    if kustomize.kustomize_command() is not None:  # kustomize reads the run folder alike
        def key(o):
            return o["kind"], o["metadata"]["name"]

        assert sorted(kustomize.build(run.folder), key=key) == sorted(
            kustomize.build_builtin(run.folder), key=key)


def test_preflight_says_which_image_tools_it_found(tmp_path):
    none = dict.fromkeys(TOOLS, "not installed")
    here = {**none, "skopeo": "/usr/bin/skopeo", "umoci": "/usr/bin/umoci",
            "docker": "/usr/bin/docker (client only: its daemon does not answer)"}
    with_buildah = {**here, "buildah": "/usr/bin/buildah"}
    pinned = f"r.example.com/hfl@sha256:{'ab' * 32}"

    plain = check_image_tools(KubernetesSettings(overlay="kata-qemu-tdx"), here)
    unbuilt = check_image_tools(KubernetesSettings(overlay=SIGNED, image="r.example.com/hfl:1"),
                                here)
    nothing = check_image_tools(KubernetesSettings(overlay=SIGNED, image="r.example.com/hfl:1"),
                                none)
    published = check_image_tools(KubernetesSettings(overlay=SIGNED, image=pinned), none)
    buildable = check_image_tools(KubernetesSettings(overlay=SIGNED, image="r.example.com/hfl:1"),
                                  with_buildah)
    local = {c.name: c for c in local_checks(LabConfig(run_dir=str(tmp_path)), python="python3",
                                             run_dir=tmp_path, processes=3)}

    assert plain.ok and "found skopeo /usr/bin/skopeo, umoci /usr/bin/umoci" in plain.detail
    assert "not found: buildah, cosign" in plain.detail and "client only" in plain.detail
    assert not unbuilt.ok and "buildah" in unbuilt.fix and "skopeo" not in unbuilt.fix
    assert not nothing.ok and "install skopeo" in nothing.fix
    assert published.ok  # made elsewhere and pinned: nothing to build here
    assert buildable.ok and "cosign signature" in buildable.detail
    assert local["container tools"].ok
    assert all(name in local["container tools"].detail for name in TOOLS)
