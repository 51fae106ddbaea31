"""The Kubernetes backend's control flow against a local double of the API server."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from kubernetes import client as k8s_client

from hfl_lab import BackendError, ImageError
from hfl_lab.backends.base import Backend
from hfl_lab.backends.kubernetes.backend import KubernetesBackend, event_from_line, role_of_pod
from hfl_lab.backends.kubernetes.cluster_api import ClusterApi
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.events import LabEvent
from tests.k8s_api_double import ApiDouble

NS = "lab-test"


#: backends a test made: their log/pod monitor threads stop when the test's double goes away
_MADE: list[KubernetesBackend] = []


@pytest.fixture()
def double():
    with ApiDouble() as d:
        yield d
        while _MADE:  # a started backend polls until teardown; not past its test
            backend = _MADE.pop()
            backend._stop.set()
            if backend._monitor is not None:
                backend._monitor.join(timeout=5)


def make_backend(double: ApiDouble, tmp_path: Path, **kw) -> KubernetesBackend:
    settings = KubernetesSettings(
        namespace=NS,
        workers=kw.pop("workers", 2),
        registry=double.hostport,
        registry_insecure=True,
        poll_interval_s=0.02,
        run_dir=tmp_path / "k8s",
        lab_config=kw.pop("lab_config", {"vault": False}),
        **kw,
    )
    api = ClusterApi(k8s_client.ApiClient(k8s_client.Configuration(host=double.url)))
    backend = KubernetesBackend(settings, api=api)
    _MADE.append(backend)
    return backend


def tdx_cluster(double: ApiDouble) -> None:
    double.put(
        "/apis/node.k8s.io/v1/runtimeclasses/kata-qemu-tdx",
        {"metadata": {"name": "kata-qemu-tdx"}, "handler": "kata-qemu-tdx"},
    )
    double.put(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/ccruntimes.confidentialcontainers.org",
        {"metadata": {"name": "ccruntimes.confidentialcontainers.org"}},
    )
    double.put(
        "/apis/confidentialcontainers.org/v1beta1/ccruntimes/ccruntime-tdx",
        {"metadata": {"name": "ccruntime-tdx"}},
    )
    double.put(
        "/api/v1/nodes/tdx-1",
        {
            "metadata": {
                "name": "tdx-1",
                "labels": {
                    "feature.node.kubernetes.io/cpu-security.tdx.enabled": "true",
                    "katacontainers.io/kata-runtime": "true",
                },
            },
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
    )


def all_pods(double: ApiDouble, workers: int, **kw) -> None:
    for name in ["trust-0", "ps-0"] + [f"worker-{i}" for i in range(workers)]:
        double.set_pod(NS, name, **kw)


def test_backend_conforms_to_protocol(double, tmp_path):
    assert isinstance(make_backend(double, tmp_path), Backend)


def test_preflight_all_ok_on_a_tdx_cluster(double, tmp_path):
    tdx_cluster(double)
    checks = make_backend(double, tmp_path, overlay="kata-qemu-tdx").preflight()
    assert [c.name for c in checks] == [
        "API server",
        "RuntimeClass",
        "CoCo operator",
        "TDX nodes",
        "registry",
        "image tools",
        "model vault",
    ]
    assert all(c.ok for c in checks), [str(c) for c in checks]
    (tools,) = [c for c in checks if c.name == "image tools"]
    assert all(name in tools.detail for name in ("skopeo", "umoci", "buildah", "docker", "cosign"))


def test_preflight_says_real_tds_need_ps0_pinned_for_the_vault(double, tmp_path):
    tdx_cluster(double)
    backend = make_backend(double, tmp_path, overlay="kata-qemu-tdx", lab_config={"vault": True})

    (vault,) = [c for c in backend.preflight() if c.name == "model vault"]

    assert not vault.ok and "mr_td" in vault.detail and "vault=false" in vault.fix
    with pytest.raises(BackendError, match=r"model vault: .*mr_td") as info:
        backend.start()
    assert "vault=false" in str(info.value)
    assert double.calls("PATCH") == []  # nothing was applied


def test_preflight_on_runc_the_vault_is_guarded_by_ps0s_measurements(double, tmp_path):
    backend = make_backend(double, tmp_path, lab_config={"vault": True})

    (vault,) = [c for c in backend.preflight() if c.name == "model vault"]

    assert vault.ok and "ps0 only" in vault.detail


@pytest.mark.parametrize(
    ("remove", "failing", "fix_word"),
    [
        ("/apis/node.k8s.io/v1/runtimeclasses/kata-qemu-tdx", "RuntimeClass", "CcRuntime"),
        (
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/ccruntimes.confidentialcontainers.org",
            "CoCo operator",
            "operator",
        ),
        (
            "/apis/confidentialcontainers.org/v1beta1/ccruntimes/ccruntime-tdx",
            "CoCo operator",
            "CcRuntime",
        ),
        ("/api/v1/nodes/tdx-1", "TDX nodes", "node-feature-discovery"),
    ],
)
def test_preflight_names_each_missing_piece_and_its_fix(
    double, tmp_path, remove, failing, fix_word
):
    tdx_cluster(double)
    del double.objects[remove]
    checks = {
        c.name: c for c in make_backend(double, tmp_path, overlay="kata-qemu-tdx").preflight()
    }
    assert not checks[failing].ok
    assert fix_word in checks[failing].fix
    assert [n for n, c in checks.items() if not c.ok] == [failing]


def test_preflight_rejects_node_without_tdx_label_and_old_cluster(double, tmp_path):
    tdx_cluster(double)
    del double.objects["/api/v1/nodes/tdx-1"]["metadata"]["labels"][
        "feature.node.kubernetes.io/cpu-security.tdx.enabled"
    ]
    double.version = {"major": "1", "minor": "27", "gitVersion": "v1.27.3"}
    checks = {
        c.name: c for c in make_backend(double, tmp_path, overlay="kata-qemu-tdx").preflight()
    }
    assert not checks["TDX nodes"].ok
    assert not checks["API server"].ok and "1.28" in checks["API server"].fix


def test_preflight_registry_and_api_unreachable(tmp_path):
    with ApiDouble() as d:
        backend = make_backend(d, tmp_path)
    # the double is shut: nothing listens there any more
    checks = {c.name: c for c in backend.preflight()}
    assert not checks["API server"].ok and "kubeconfig" in checks["API server"].fix
    assert not checks["registry"].ok and "registry.sh" in checks["registry"].fix
    assert "not checked" in checks["nodes"].detail


def test_preflight_runc_needs_no_tdx(double, tmp_path):
    double.put(
        "/api/v1/nodes/n1",
        {
            "metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
    )
    checks = make_backend(double, tmp_path).preflight()
    assert [c.name for c in checks] == [
        "API server", "nodes", "registry", "image tools", "model vault"]
    assert all(c.ok for c in checks)


def test_preflight_with_kubeconfig_file_sends_its_token(double, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{double.url}"}}}}]
users: [{{name: u, user: {{token: lab-token-123}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    settings = KubernetesSettings(
        namespace=NS, kubeconfig=str(kubeconfig), registry=double.hostport, registry_insecure=True
    )
    checks = KubernetesBackend(settings).preflight()
    assert checks[0].ok
    headers = {k.lower(): v for k, v in double.requests[0][2].items()}
    assert headers.get("authorization") == "Bearer lab-token-123"


def test_missing_kubeconfig_is_a_failed_check(tmp_path):
    settings = KubernetesSettings(kubeconfig=str(tmp_path / "nope"))
    checks = KubernetesBackend(settings).preflight()
    assert len(checks) == 1 and not checks[0].ok and "kubeconfig" in checks[0].fix


def secret_payload(double: ApiDouble, name: str) -> dict:
    secret = double.objects[f"/api/v1/namespaces/{NS}/secrets/{name}"]
    assert secret["immutable"] is True and secret["type"] == "Opaque"
    return json.loads(base64.b64decode(secret["data"]["bootstrap.json"]))


def test_start_applies_every_object_server_side(double, tmp_path):
    backend = make_backend(double, tmp_path, workers=3)
    backend.start()
    backend._stop.set()
    patched = double.calls("PATCH")
    assert len(patched) == len(backend.render()) + 2  # + the two bootstrap Secrets
    assert patched[0].startswith("/api/v1/namespaces/lab-test?")
    assert all("fieldManager=hfl-lab" in p and "force=true" in p for p in patched)
    secrets = [i for i, p in enumerate(patched) if "/secrets/" in p]
    statefulsets = [i for i, p in enumerate(patched) if "/statefulsets/" in p]
    assert len(secrets) == 2 and max(secrets) < min(statefulsets)  # mounted ones exist first
    sts = double.objects[f"/apis/apps/v1/namespaces/{NS}/statefulsets/worker"]
    assert sts["spec"]["replicas"] == 3
    assert (tmp_path / "k8s" / "kustomization.yaml").is_file()


def test_start_hands_the_bootstrap_to_pods_through_secrets_only(double, tmp_path):
    backend = make_backend(double, tmp_path, workers=2)
    backend.start()
    backend._stop.set()
    assert backend.platform is not None
    platform_hex = backend.platform.export_secret().hex()
    trust = secret_payload(double, "hfl-bootstrap-trust")
    td = secret_payload(double, "hfl-bootstrap-td")
    # the simulated platform's keys only: the owner's credential is in no Secret (it reaches
    # the trust service over its attested channel, Provision)
    assert trust == {"platform": platform_hex} and td == {"platform": platform_hex}
    mounted = {}
    for name in ("trust", "ps", "worker"):
        spec = double.objects[f"/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"]["spec"]
        pod = spec["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "bootstrap")
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["bootstrap"]["readOnly"] is True
        assert env["HFL_LAB_BOOTSTRAP_FILE"] == mounts["bootstrap"]["mountPath"] + "/bootstrap.json"
        mounted[name] = volume["secret"]["secretName"]
    assert mounted == {"trust": "hfl-bootstrap-trust", "ps": "hfl-bootstrap-td",
                       "worker": "hfl-bootstrap-td"}
    # no secret in the run folder, in what the backend keeps, or in its repr
    for file in (tmp_path / "k8s").rglob("*"):
        text = file.read_text() if file.is_file() else ""
        assert platform_hex not in text and backend.admin_token.hex() not in text
    assert all("data" not in o for o in backend.applied if o["kind"] == "Secret")
    assert backend.admin_token.hex() not in repr(backend)


def test_tdx_overlay_creates_no_secret_at_all(double, tmp_path):
    backend = make_backend(double, tmp_path, overlay="kata-qemu-tdx")
    backend.start()
    backend._stop.set()
    assert not [p for p in double.objects if "/secrets/" in p]
    assert backend.platform is None
    for name in ("trust", "ps", "worker"):
        pod = double.objects[f"/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"]["spec"][
            "template"]["spec"]
        assert all(v["name"] != "bootstrap" for v in pod["volumes"])
        assert all(e["name"] != "HFL_LAB_BOOTSTRAP_FILE" for e in pod["containers"][0]["env"])


def test_start_reports_forbidden_with_rbac_fix(double, tmp_path):
    double.fail[("PATCH", f"/api/v1/namespaces/{NS}/configmaps/hfl-config")] = (403, "no rights")
    with pytest.raises(BackendError, match="RBAC"):
        make_backend(double, tmp_path).start()


def test_wait_ready_reports_progress_and_lifecycle(double, tmp_path):
    backend = make_backend(double, tmp_path, workers=2)
    all_pods(double, 2, ready=False, phase="Pending")
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int, label: str) -> None:
        seen.append((done, total))
        if len(seen) == 2:
            all_pods(double, 2)

    backend.wait_ready(timeout_s=10, progress=progress)
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    states = [
        (e.source, e.data["state"])
        for e in backend.events(idle_timeout_s=0.2)
        if e.kind == "lifecycle"
    ]
    assert ("worker1", "starting") in states and ("worker1", "ready") in states
    assert states.index(("ps0", "starting")) < states.index(("ps0", "ready"))


def test_wait_ready_fails_fast_on_image_pull_backoff(double, tmp_path):
    backend = make_backend(double, tmp_path, workers=1)
    all_pods(double, 1)
    double.set_pod(NS, "worker-0", phase="Pending", ready=False, waiting="ImagePullBackOff")
    with pytest.raises(BackendError, match=r"worker-0 \(worker0\).*ImagePullBackOff.*registry"):
        backend.wait_ready(timeout_s=30)
    # fast: at the first listing of the pods, not after more polls (a count, not a time)
    pods = f"/api/v1/namespaces/{NS}/pods"
    listings = [p for p in double.calls("GET") if p.split("?")[0] == pods]
    assert len(listings) == 1


def test_wait_ready_times_out_naming_missing_pods(double, tmp_path):
    backend = make_backend(double, tmp_path, workers=2)
    double.set_pod(NS, "trust-0")
    with pytest.raises(BackendError, match=r"1 of 4 pods ready.*ps-0 \(not created\)"):
        backend.wait_ready(timeout_s=0.2)


def test_logs_become_events_in_the_same_stream(double, tmp_path):
    backend = make_backend(double, tmp_path, workers=1)
    metric = LabEvent("metrics", "worker0", {"role": "worker0", "step": 3, "loss": 1.5}, time=5.0)
    double.logs[("worker-0", "worker")] = ["ERROR: shard missing", metric.to_json()]
    double.logs[("ps-0", "ps")] = ["serving on :50051"]
    all_pods(double, 1)
    backend.wait_ready(timeout_s=5)
    # the log lines come from follower threads that wait_ready's polls started: read until
    # they have all come (a busy machine may start a follower long after the last poll)
    wanted = {("worker0", "error", "ERROR: shard missing"), ("ps0", "info", "serving on :50051")}
    events: list[LabEvent] = []
    logs: list[tuple[str, str, str]] = []
    for event in backend.events(idle_timeout_s=60):
        events.append(event)
        logs = [(e.source, e.data["level"], e.data["message"]) for e in events if e.kind == "log"]
        if wanted <= set(logs) and metric in events:
            break
    assert ("worker0", "error", "ERROR: shard missing") in logs
    assert ("ps0", "info", "serving on :50051") in logs
    assert metric in events
    follows = [p for p in double.calls("GET") if "/log?" in p]
    assert any("worker-0/log?container=worker&follow=true" in p for p in follows)
    assert all("container=" in p for p in follows)


def test_fetch_vault_copies_over_exec_and_checks_digest(double, tmp_path):
    backend = make_backend(double, tmp_path)
    double.set_pod(NS, "ps-0")
    payload = bytes(range(256)) * 4096 + b"LUKS"  # binary, > one websocket frame
    double.files[("ps-0", "ps")] = {"/vault/model.luks": payload}
    out = backend.fetch_vault(tmp_path / "out" / "model.luks")
    assert out.read_bytes() == payload
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()
    execs = [p for p in double.calls("GET") if "/exec?" in p]
    assert len(execs) == 2 and all("container=ps" in p for p in execs)


def test_tdx_fetch_reads_the_volume_through_a_reader_pod_not_exec_into_the_td(double, tmp_path):
    # the agent policy of the TDX overlays denies exec into a TD (issue 18, item 1)
    backend = make_backend(double, tmp_path, overlay="kata-qemu-tdx")
    double.set_pod(NS, "ps-0")
    payload = b"LUKS\xba\xbe" + bytes(range(256)) * 300
    double.files[("hfl-reader-vault", "reader")] = {"/claim/model.luks": payload}

    out = backend.fetch_vault(tmp_path / "out" / "model.luks")

    assert out.read_bytes() == payload
    execs = [p for p in double.calls("GET") if "/exec?" in p]
    assert execs and all("/pods/hfl-reader-vault/exec?" in p and "container=reader" in p
                         for p in execs)
    reader = f"/api/v1/namespaces/{NS}/pods/hfl-reader-vault"
    assert len([p for p in double.calls("PATCH") if p.startswith(reader + "?")]) == 1
    assert [p for p in double.calls("DELETE") if p.startswith(reader)]
    assert reader not in double.objects  # gone after the copy


def test_tdx_fetch_names_a_reader_pod_that_cannot_start(double, tmp_path):
    backend = make_backend(double, tmp_path, overlay="kata-qemu-tdx")
    double.set_pod(NS, "ps-0")
    double.new_pod_phase = "Failed"
    with pytest.raises(BackendError, match=r"reader pod hfl-reader-vault.*did not start"):
        backend.fetch_vault(tmp_path / "model.luks")
    reader = f"/api/v1/namespaces/{NS}/pods/hfl-reader-vault"
    assert [p for p in double.calls("DELETE") if p.startswith(reader)]


def test_fetch_vault_before_the_vault_exists(double, tmp_path):
    backend = make_backend(double, tmp_path)
    double.set_pod(NS, "ps-0")
    with pytest.raises(BackendError, match=r"No such file.*Fix: wait until the PS has written"):
        backend.fetch_vault(tmp_path / "model.luks")
    assert not (tmp_path / "model.luks").exists()


def test_fetch_vault_rejects_a_copy_that_does_not_match(double, tmp_path):
    backend = make_backend(double, tmp_path)
    double.set_pod(NS, "ps-0")
    double.files[("ps-0", "ps")] = {"/vault/model.luks": b"A" * 1000}
    real_run = double.run

    def tampered(pod, container, command):  # the file changes between the two execs
        out, err, code = real_run(pod, container, command)
        if command[0] == "sha256sum":
            double.files[("ps-0", "ps")] = {"/vault/model.luks": b"B" * 1000}
        return out, err, code

    double.run = tampered
    with pytest.raises(BackendError, match="corrupt"):
        backend.fetch_vault(tmp_path / "model.luks")
    assert list(tmp_path.glob("*model.luks*")) == []


def test_collect_sealed_model_copies_the_volume_and_the_sealed_state(double, tmp_path):
    backend = make_backend(double, tmp_path, lab_config={"vault": True})
    backend.start()
    token = backend.admin_token
    volume, state = b"LUKS\xba\xbe" + bytes(5000), b"sealed state" * 100
    double.set_pod(NS, "ps-0")
    double.set_pod(NS, "trust-0")
    double.files[("ps-0", "ps")] = {"/vault/model.luks": volume}
    double.files[("trust-0", "trust")] = {"/var/lib/hfl-lab/trust/state.sealed": state}

    backend.collect_sealed_model()

    assert backend.vault_path == tmp_path / "vault" / "model.luks"
    assert backend.vault_path.read_bytes() == volume
    assert backend.trust_state_path.read_bytes() == state
    public = sorted(p.name for p in backend.trust_dir.iterdir())
    assert public == ["owner.json", "platform.json", "state.sealed", "volume_policy.yaml"]
    assert token.hex() not in "".join(p.read_text(errors="replace")
                                      for p in backend.trust_dir.iterdir())
    # notebook 05's kernel (same session, another backend object) derives the same key
    again = make_backend(double, tmp_path, lab_config={"vault": True})
    assert again.admin_token == token
    assert again.owner_credential().owner_key == backend.owner_credential().owner_key


def test_collect_without_the_vault_copies_nothing(double, tmp_path):
    backend = make_backend(double, tmp_path)
    backend.start()
    backend.collect_sealed_model()
    assert not [p for p in double.calls("GET") if "/exec?" in p]
    assert not backend.vault_path.exists()


def test_teardown_deletes_everything_and_ends_events(double, tmp_path):
    backend = make_backend(double, tmp_path)
    backend.start()
    applied = {p.split("?")[0] for p in double.calls("PATCH")}
    assert applied <= set(double.objects)
    consumer_done = threading.Event()
    got: list[LabEvent] = []

    def consume() -> None:
        got.extend(backend.events())
        consumer_done.set()

    threading.Thread(target=consume, daemon=True).start()
    backend.teardown()
    assert consumer_done.wait(60)  # the consumer thread, however late it runs, sees the end
    assert applied.isdisjoint(double.objects)
    deleted = [p.split("?")[0] for p in double.calls("DELETE")]
    assert deleted[-1] == f"/api/v1/namespaces/{NS}"
    assert {f"/api/v1/namespaces/{NS}/secrets/hfl-bootstrap-trust",
            f"/api/v1/namespaces/{NS}/secrets/hfl-bootstrap-td"} <= set(deleted)
    assert not [p for p in double.objects if "/secrets/" in p]
    assert got[-1].kind == "lifecycle" and got[-1].data["state"] == "exited"
    backend.teardown()  # a second teardown finds nothing and does not fail


def test_role_and_line_mapping():
    pods = ("trust-0", "ps-0", "worker-11")
    assert [role_of_pod(p) for p in pods] == ["trust", "ps0", "worker11"]
    assert event_from_line("ps0", '{"not": "an event"}').kind == "log"
    assert event_from_line("ps0", "WARNING slow").data["level"] == "warning"


def test_participant_reads_the_pod_bootstrap_file_and_names_a_bad_one(tmp_path, monkeypatch):
    from hfl_lab import ConfigError
    from hfl_lab.tee.sim.platform import SimulatedPlatform
    from trainer.participant import BOOTSTRAP_FILE_ENV, read_bootstrap

    platform = SimulatedPlatform.generate()
    token = bytes(range(32))
    good = tmp_path / "bootstrap.json"
    good.write_text(json.dumps({"platform": platform.export_secret().hex(),
                                "admin_token": token.hex()}))
    monkeypatch.setenv(BOOTSTRAP_FILE_ENV, str(good))
    before = set(threading.enumerate())
    boot = read_bootstrap()
    # an admin credential in a bootstrap is not read: the trust service gets it only by Provision
    assert not hasattr(boot, "admin_token") and token.hex() not in repr(boot)
    assert boot.platform is not None
    assert boot.platform.root_der == platform.root_der
    # no stdin watchdog in a pod: no thread that was not there before (a count would also
    # change when an earlier test's daemon thread ends meanwhile)
    assert [t for t in threading.enumerate() if t not in before] == []
    bad = tmp_path / "bad.json"
    bad.write_text('{"platform": "' + "zz" * 32 + '"}')
    monkeypatch.setenv(BOOTSTRAP_FILE_ENV, str(bad))
    with pytest.raises(ConfigError, match=r"bootstrap file .* is not valid") as info:
        read_bootstrap()
    assert "zz" not in str(info.value)
    monkeypatch.setenv(BOOTSTRAP_FILE_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="cannot read the bootstrap file"):
        read_bootstrap()


SIGNED = "kata-qemu-tdx-encrypted-signed"


def tools_only(tmp_path: Path, *names: str) -> str:
    """A PATH holding only ``names`` (links to this machine's), e.g. no buildah or docker."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name in names:
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed here (make system-deps)")
        (folder / name).symlink_to(found)
    return str(folder)


def test_the_signed_overlay_publishes_its_image_at_start_only_when_asked(
    double, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", tools_only(tmp_path, "skopeo", "gpg", "gpgconf", "umoci"))
    pinned = f"{double.hostport}/hfl-lab@sha256:{'ab' * 32}"

    def wants(**kw) -> bool:
        return make_backend(double, tmp_path, **kw).wants_image()

    assert not wants(overlay="runc", lab_config={"workload_image": "on"})
    assert not wants(overlay="kata-qemu-tdx", lab_config={"workload_image": "on"})
    assert not wants(overlay=SIGNED, image=pinned, lab_config={"workload_image": "on"})
    assert not wants(overlay=SIGNED, lab_config={"workload_image": "off"})
    assert wants(overlay=SIGNED, lab_config={"workload_image": "on"})
    # auto: only where a builder works, and none does on this PATH
    assert not wants(overlay=SIGNED, lab_config={"workload_image": "auto"})


def test_start_with_workload_image_on_and_no_builder_is_refused_before_anything_is_applied(
    double, tmp_path, monkeypatch
):
    # Arrange: the image tools, but neither buildah nor docker
    monkeypatch.setenv("PATH", tools_only(tmp_path, "skopeo", "gpg", "gpgconf", "umoci"))
    tdx_cluster(double)
    backend = make_backend(double, tmp_path, overlay=SIGNED,
                           image=f"{double.hostport}/hfl-lab:0.1.0",
                           lab_config={"vault": False, "workload_image": "on"})

    # Act
    with pytest.raises(ImageError, match="needs buildah or docker") as refused:
        backend.start()

    # Assert: one sentence and the fix; nothing reached the cluster, no key was kept
    assert refused.value.fix is not None and "apt-get install buildah" in refused.value.fix
    assert backend.applied == [] and backend.layer_key is None
    assert not any(f"/namespaces/{NS}" in path for path in double.objects)
