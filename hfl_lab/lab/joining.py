"""Joining a hosted run (issue 23 item 3): verify the host's trust service against the join
link before sending it anything, enroll with the link, start this site's worker TD.

The trust service's RA-TLS certificate carries its TDX evidence. The joiner reads it from the
TLS handshake (nothing of its own is sent), compares the measurements with the ones the link
names (the differing one is named), then verifies the evidence in full under a policy made of
the link alone: a TDX quote whose chain ends in the root the link names (the simulated lab
platform's, or Intel's for real TDX), the link's MR_TD and MR_CONFIG_ID for the trust role, and
the certificate's key bound into REPORTDATA.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from hfl_lab._exceptions import AttestationError, QuoteFormatError
from hfl_lab.attestation.api import parse_address
from hfl_lab.attestation.evidence_input import LoadedEvidence, load_certificate_evidence
from hfl_lab.backends.kubernetes.cluster_api import ClusterApi
from hfl_lab.backends.kubernetes.remote_worker import (
    RemoteWorker,
    RemoteWorkerSite,
    apply_remote_worker,
    render_remote_worker,
)
from hfl_lab.backends.local.joiner import JoinedWorker
from hfl_lab.config.join_link import JoinLink
from hfl_lab.ratls import fetch_server_certificate, verify_certificate
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.reports import TdReport10
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.client import TrustClient

__all__ = ["JoinedWorker", "RemoteWorker", "RemoteWorkerSite", "connect_host", "join_kubernetes",
           "join_run", "link_policy", "verify_host"]

TRUST_ROLE = "trust"
INTEL_PCS = "https://api.trustedservices.intel.com"
_FIX_ASK_HOST = ("do not join: ask the host whether its trust service was changed, and get a "
                 "link printed by the running host.")


def link_policy(link: JoinLink) -> AttestationPolicy:
    """The policy the link alone defines for the host's trust service."""
    return AttestationPolicy.from_dict({
        "tee_type": "TDX",
        "mr_td": [link.trust_measurements["mr_td"]],
        "allow_simulated": bool(link.lab_root_sha256),
        # a hardware host's quote is checked against Intel's collateral (public, signed by
        # Intel: any PCCS serves the same); a simulated one against the lab's
        **({} if link.lab_root_sha256 else {"pccs_url": INTEL_PCS}),
        "allow_debug": False,
        "roles": {TRUST_ROLE: {"mr_config_id": link.trust_measurements["mr_config_id"]}},
    })


def verify_host(link: JoinLink, *, timeout_s: float = 10.0) -> Verdict:
    """Verify the trust service at the link's address; raise ``AttestationError`` naming the
    check that failed (a differing measurement by name, expected and actual)."""
    host, port = parse_address(link.trust_address)
    cert = fetch_server_certificate(host, port, timeout=timeout_s)
    loaded = load_certificate_evidence(cert, source=link.trust_address,
                                       encoding="tls-handshake")
    body = loaded.quote.body
    if not isinstance(body, TdReport10):
        raise AttestationError(
            f"the host's trust service at {link.trust_address} presents no TDX evidence.",
            check="tee_type", fix=_FIX_ASK_HOST)
    link.check_trust_service({"mr_td": body.mr_td.hex(),
                              "mr_config_id": body.mr_config_id.hex()})
    verifier = Verifier(link_policy(link), lab_root_der=_lab_root(link, loaded),
                        name="joiner")
    assert loaded.certificate is not None
    verdict = verify_certificate(loaded.certificate, verifier, role=TRUST_ROLE)
    if not verdict.accepted:
        failed = [c for c in verdict.checks if not c.passed]
        first = failed[0] if failed else None
        raise AttestationError(
            f"the host's trust service at {link.trust_address} failed attestation: "
            + "; ".join(f"{c.name}: {c.reason or c.actual}" for c in failed) + ".",
            check=first.name if first else "attestation",
            expected=first.expected if first else None,
            actual=first.actual if first else None, fix=_FIX_ASK_HOST)
    return verdict


def _lab_root(link: JoinLink, loaded: LoadedEvidence) -> bytes | None:
    """The simulated platform's root from the evidence's own chain, if its digest is the
    link's; None for real TDX (Intel's root)."""
    if not link.lab_root_sha256:
        return None
    try:
        certs = loaded.quote.signature_data.pck_certificates()
    except QuoteFormatError:
        certs = []
    root = certs[-1].public_bytes(serialization.Encoding.DER) if certs else b""
    digest = hashlib.sha256(root).hexdigest()
    if digest != link.lab_root_sha256:
        raise AttestationError(
            f"the host's trust service at {link.trust_address} signs its evidence under a root "
            f"the join link does not name (sha256 {digest[:16]}..., the link expects "
            f"{link.lab_root_sha256[:16]}...).",
            check="root", expected=link.lab_root_sha256, actual=digest, fix=_FIX_ASK_HOST)
    return root


def connect_host(link: JoinLink, *, timeout_s: float = 10.0) -> TrustClient:
    """A client of the host's trust service, pinned to the certificate that passed
    :func:`verify_host`."""
    verify_host(link, timeout_s=timeout_s)
    host, port = parse_address(link.trust_address)
    cert = fetch_server_certificate(host, port, timeout=timeout_s)
    loaded = load_certificate_evidence(cert, source=link.trust_address,
                                       encoding="tls-handshake")
    return TrustClient.connect(link.trust_address, link_policy(link),
                               lab_root_der=_lab_root(link, loaded), role=TRUST_ROLE,
                               verifier_name="joiner")


def join_run(link_text: str, *, run_dir: str | Path, data_path: str | None = None,
             timeout_s: float = 10.0, workload_root: Path | None = None) -> JoinedWorker:
    """``hfl-lab join``: check the link, verify the host, enroll, start this site's worker TD.

    Returns the started worker; read its :meth:`~JoinedWorker.events`, and :meth:`stop` it to
    leave. ``workload_root``: the checkout the worker runs (default: this one); its code is what
    the worker's TD measures."""
    link = JoinLink.parse(link_text)
    with connect_host(link, timeout_s=timeout_s) as trust:
        documents = trust.enroll(link.encode())
    worker = JoinedWorker(link.slot, documents, run_dir=Path(run_dir), data_path=data_path,
                          workload_root=workload_root)
    worker.start()
    return worker


def join_kubernetes(link_text: str, out_dir: str | Path, site: RemoteWorkerSite, *,
                    apply: bool = False, kubeconfig: str | None = None,
                    context: str | None = None, timeout_s: float = 10.0) -> RemoteWorker:
    """``hfl-lab join <link> --kubernetes <dir>``: check the link, verify the host, enroll, and
    render this site's worker as a pod of its own cluster into ``out_dir`` (see
    :mod:`hfl_lab.backends.kubernetes.remote_worker`); with ``apply``, create its bootstrap
    Secret (from memory) and its objects in the cluster of ``kubeconfig``/``context``."""
    link = JoinLink.parse(link_text)
    with connect_host(link, timeout_s=timeout_s) as trust:
        documents = trust.enroll(link.encode())
    remote = render_remote_worker(link, documents, site, Path(out_dir))
    if apply:
        apply_remote_worker(ClusterApi.connect(kubeconfig, context), remote, documents)
    return remote
