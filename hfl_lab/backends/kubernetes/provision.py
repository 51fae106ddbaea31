"""The owner provisions a run's trust service: verify its TD, then send the admin credential.

The trust pod starts with no secret of the owner's (no Secret, no ConfigMap, no environment
variable carries one): only the owner's public policy key is in its measured configuration. When
it logs ``provisioning``, the owner's backend reaches it (through the ingress's TLS passthrough,
``KubernetesSettings.trust_endpoint``, or a port-forward through the Kubernetes API), verifies
its RA-TLS evidence against the run's policy (role ``trust``: its own MR_CONFIG_ID), pins its
certificate and sends the credential over that session (``Provision``). A service that fails
the check gets nothing, and the run stops with the reason.
"""

from __future__ import annotations

import time

from hfl_lab._exceptions import AttestationError, BackendError, HflLabError, PolicyViolation
from hfl_lab.backends.base import refused_by_owner
from hfl_lab.image import LayerKey
from hfl_lab.image import register_layer_key as register_with
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.trust.client import TrustClient

#: what the owner's verdicts on the trust service are named
VERIFIER = "owner"


def provision_trust(
    address: str,
    policy: AttestationPolicy,
    admin_token: bytes,
    *,
    lab_root_der: bytes | None = None,
    timeout_s: float = 120.0,
    retry_s: float = 1.0,
) -> str:
    """Verify the trust service at ``address`` and provision it; its answer ("provisioned" or
    "already provisioned"). Retries while it cannot be reached, up to ``timeout_s``; a service
    that fails attestation or refuses the credential is not retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with TrustClient.connect(address, policy, lab_root_der=lab_root_der, role="trust",
                                     verifier_name=VERIFIER) as client:
                return client.provision(admin_token)
        except PolicyViolation as error:
            raise BackendError(
                f"the trust service refused the owner's credential: {error.message}",
                fix="the trust pod's configuration names another owner's policy key, so it was "
                "not rendered by this session's backend: tear the run down and start it again "
                "from here.",
            ) from None
        except AttestationError as error:
            if error.check != "connection" or time.monotonic() + retry_s > deadline:
                raise _not_provisioned(address, error) from None
        except HflLabError as error:
            raise _not_provisioned(address, error) from None
        time.sleep(retry_s)


def register_layer_key(
    address: str,
    policy: AttestationPolicy,
    admin_token: bytes,
    key: LayerKey,
    release: AttestationPolicy,
    *,
    lab_root_der: bytes | None = None,
) -> None:
    """As the owner: verify the (provisioned) trust service at ``address`` as :func:`
    provision_trust` does, then register the image's layer key in its key broker under
    ``release`` (the participants that may pull the image). Nothing is sent to a service that
    fails the check."""
    try:
        with TrustClient.connect(address, policy, lab_root_der=lab_root_der, role="trust",
                                 verifier_name=VERIFIER) as client:
            register_with(client, key, release, admin_token)
    except PolicyViolation as error:
        raise BackendError(
            f"the trust service refused the image's layer key: {error.message}",
            fix=error.fix or "provision the trust service first (provision_trust()).",
        ) from None
    except HflLabError as error:
        raise _not_provisioned(address, error) from None


def _not_provisioned(address: str, error: HflLabError) -> HflLabError:
    """An unreachable service as a ``BackendError`` (what to check on the cluster's side); one
    that failed the owner's check as the local backend names it (``refused_by_owner``: an
    ``AttestationError`` keeps its check and the values compared)."""
    if isinstance(error, AttestationError) and error.check == "connection":
        return BackendError(
            f"cannot reach the trust service at {address} to provision it: {error.message}",
            fix="check that the trust pod runs (kubectl get pods) and that the path to it "
            "works: the port-forward through the API server, or the ingress named by "
            "trust_endpoint (TLS passthrough).",
        )
    if error.fix is None:
        error.fix = "check that the pod runs the run's image and configuration."
    return refused_by_owner(error)
