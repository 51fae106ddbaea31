"""The Kubernetes backend's control flow against a local double of the API server."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from k8s_api_double import ApiDouble
from kubernetes import client as k8s_client

from hfl_lab import BackendError
from hfl_lab.backends.base import Backend
from hfl_lab.backends.kubernetes.api import ClusterApi
from hfl_lab.backends.kubernetes.backend import KubernetesBackend, event_from_line, role_of
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.events import LabEvent

NS = "lab-test"


@pytest.fixture()
def double():
    with ApiDouble() as d:
        yield d


def make_backend(double: ApiDouble, tmp_path: Path, **kw) -> KubernetesBackend:
    settings = KubernetesSettings(
        namespace=NS,
        workers=kw.pop("workers", 2),
        registry=double.hostport,
        registry_insecure=True,
        poll_interval_s=0.02,
        run_dir=tmp_path / "k8s",
        **kw,
    )
    api = ClusterApi(k8s_client.ApiClient(k8s_client.Configuration(host=double.url)))
    return KubernetesBackend(settings, api=api)


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
    ]
    assert all(c.ok for c in checks), [str(c) for c in checks]


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
    assert [c.name for c in checks] == ["API server", "nodes", "registry"]
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


def test_start_applies_every_object_server_side(double, tmp_path):
    backend = make_backend(double, tmp_path, workers=3)
    backend.start()
    backend._stop.set()
    patched = double.calls("PATCH")
    assert len(patched) == len(backend.render())
    assert patched[0].startswith("/api/v1/namespaces/lab-test?")
    assert all("fieldManager=hfl-lab" in p and "force=true" in p for p in patched)
    sts = double.objects[f"/apis/apps/v1/namespaces/{NS}/statefulsets/worker"]
    assert sts["spec"]["replicas"] == 3
    assert (tmp_path / "k8s" / "kustomization.yaml").is_file()


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
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"worker-0 \(worker0\).*ImagePullBackOff.*registry"):
        backend.wait_ready(timeout_s=30)
    assert time.monotonic() - t0 < 5


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
    events = list(backend.events(idle_timeout_s=0.5))
    logs = [(e.source, e.data["level"], e.data["message"]) for e in events if e.kind == "log"]
    assert ("worker0", "error", "ERROR: shard missing") in logs
    assert ("ps0", "info", "serving on :50051") in logs
    assert metric in events
    follows = [p for p in double.calls("GET") if "/log?" in p]
    assert any("worker-0/log?container=worker&follow=true" in p for p in follows)
    assert not any("container=vault" in p for p in follows)


def test_fetch_vault_copies_over_exec_and_checks_digest(double, tmp_path):
    backend = make_backend(double, tmp_path)
    double.set_pod(NS, "ps-0")
    payload = bytes(range(256)) * 4096 + b"LUKS"  # binary, > one websocket frame
    double.files[("ps-0", "vault")] = {"/vault/model.luks": payload}
    out = backend.fetch_vault(tmp_path / "out" / "model.luks")
    assert out.read_bytes() == payload
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()
    execs = [p for p in double.calls("GET") if "/exec?" in p]
    assert len(execs) == 2 and all("container=vault" in p for p in execs)


def test_fetch_vault_before_the_vault_exists(double, tmp_path):
    backend = make_backend(double, tmp_path)
    double.set_pod(NS, "ps-0")
    with pytest.raises(BackendError, match=r"No such file.*Fix: wait until the PS has sealed"):
        backend.fetch_vault(tmp_path / "model.luks")
    assert not (tmp_path / "model.luks").exists()


def test_fetch_vault_rejects_a_copy_that_does_not_match(double, tmp_path):
    backend = make_backend(double, tmp_path)
    double.set_pod(NS, "ps-0")
    double.files[("ps-0", "vault")] = {"/vault/model.luks": b"A" * 1000}
    real_run = double.run

    def tampered(pod, container, command):  # the file changes between the two execs
        out, err, code = real_run(pod, container, command)
        if command[0] == "sha256sum":
            double.files[("ps-0", "vault")] = {"/vault/model.luks": b"B" * 1000}
        return out, err, code

    double.run = tampered
    with pytest.raises(BackendError, match="corrupt"):
        backend.fetch_vault(tmp_path / "model.luks")
    assert list(tmp_path.glob("*model.luks*")) == []


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
    assert consumer_done.wait(5)
    assert applied.isdisjoint(double.objects)
    deleted = [p.split("?")[0] for p in double.calls("DELETE")]
    assert deleted[-1] == f"/api/v1/namespaces/{NS}"
    assert got[-1].kind == "lifecycle" and got[-1].data["state"] == "exited"
    backend.teardown()  # a second teardown finds nothing and does not fail


def test_role_and_line_mapping():
    assert [role_of(p) for p in ("trust-0", "ps-0", "worker-11")] == ["trust", "ps0", "worker11"]
    assert event_from_line("ps0", '{"not": "an event"}').kind == "log"
    assert event_from_line("ps0", "WARNING slow").data["level"] == "warning"
