"""The volume passphrase in the key broker: provisioned by the owner, released to attested TDs.

The lab owner creates the volume with a fresh random passphrase, registers it with the trust
service's key broker under ``(DEFAULT_APP_ID, VOLUME_SECRET_NAME)`` together with a release policy
that names the parameter server's measurements (and the owner's trusted node), and forgets it.
From then on the passphrase exists only inside the key broker and, briefly, in the memory of an
attested TD that asked for it: the PS, to write checkpoints, and the owner's trusted node, to
retrieve the model.

On a cluster the owner's machine cannot reach the trust service, so the passphrase is born in
the trust service's own TD instead (``python -m trainer trust --volume-policy``, see
:func:`release_policy_from`), and ps0 creates the volume in its pod at its first start with the
passphrase released to it (``open_vault_for_ps(create_size_mb=...)``). Either way nobody outside
the key broker and an attested TD ever holds it; the owner reaches it afterwards through the
trust service's sealed state.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hfl_lab._exceptions import AttestationError, HflLabError, PolicyViolation, VaultError
from hfl_lab.owner import unsealing_failed
from hfl_lab.tee.evidence import EvidenceProvider
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.sealed import HEADS, CheckpointHead, state_counter, unseal_state
from hfl_lab.vault.luks_header import LuksHeader, read_header
from hfl_lab.vault.model_vault import ModelVault, PathKind, choose_data_path, new_passphrase
from hfl_lab.vault.owner_open import RetrievedModel, retrieve_model
from hfl_lab.vault.provenance import Signers
from hfl_lab.vault.rollback import OwnerCounter

if TYPE_CHECKING:
    from hfl_lab.ratls.certificate import RaTlsIdentity
    from hfl_lab.tee.sim.measure import TdMeasurements
    from hfl_lab.trust.client import TrustClient

log = logging.getLogger(__name__)

#: the key broker name of the model volume's passphrase (application ID: ``DEFAULT_APP_ID``)
VOLUME_SECRET_NAME = "model-volume"  # noqa: S105 - a name, not a secret
OWNER_ROLE = "owner"
_MAY_RECEIVE = re.compile(r"^(ps\d+|owner)$")
# Without these two a TD could receive the passphrase while running other code (MR_TD) or
# another role's configuration (MR_CONFIG_ID, which the host chooses at launch).
_PINNED = ("mr_td", "mr_config_id")
_MIN_DATA_SEGMENT = 4 * 1024 * 1024


@dataclass(frozen=True)
class VaultInfo:
    """A provisioned volume: where it is and what it is, never its passphrase."""

    path: Path
    uuid: str
    data_path_kind: Literal["kernel", "userspace"]
    size_bytes: int
    luks_version: int
    created: bool  # False when ``reuse=True`` found the volume already there

    @property
    def size_mb(self) -> int:
        return self.size_bytes // (1024 * 1024)


@dataclass(frozen=True)
class SealedBrokerState:
    """The owner's authorized (not attested) way to the passphrase: the trust service's sealed
    state file and the owner key that seals it, for a trusted node that is not a TD.

    ``counter_path`` is the owner's copy of the state's counter (``OwnerCounter``): a state
    older than the newest the owner saw is refused, and a newer one advances the copy.
    """

    state_path: Path
    owner_key: bytes
    counter_path: Path | None = None

    def __repr__(self) -> str:
        return f"SealedBrokerState(state_path={str(self.state_path)!r}, owner_key=<hidden>)"


OwnerCredential = EvidenceProvider | SealedBrokerState


# -- the release policy --------------------------------------------------------------------------


def volume_release_policy(
    ps: TdMeasurements | Mapping[str, str],
    owner: TdMeasurements | Mapping[str, str] | None = None,
    *,
    base: AttestationPolicy | None = None,
    ps_role: str = "ps0",
) -> AttestationPolicy:
    """Who may receive the passphrase: the PS's TD and the owner's trusted node, nobody else.

    ``ps``/``owner`` are measurements (or their ``summary()``: hex ``mr_td``/``mr_config_id``).
    The defaults are the PS's, so a TD asking under a role the policy does not name (a worker)
    is held to the PS's measurements and refused. ``base`` supplies the other rules (TCB
    statuses, ``allow_simulated``); the evidence must bind the requester's key and the nonce.
    """
    named = {ps_role: _reference(ps)}
    if owner is not None:
        named[OWNER_ROLE] = _reference(owner)
    fields = (base or AttestationPolicy()).to_dict()
    fields.update(named[ps_role])
    fields["report_data_binding"] = "key+nonce"
    fields["roles"] = named
    return AttestationPolicy.from_dict(fields)


def release_policy_from(policy: AttestationPolicy, ps_role: str = "ps0") -> AttestationPolicy:
    """The volume's release policy derived from the owner's attestation policy for the run:
    the PS's reference values (MR_TD, MR_CONFIG_ID, as the policy names them for ``ps_role``)
    pinned for ``ps_role`` and for every role the policy does not name, and the policy's other
    rules. ``VaultError`` (via :func:`check_release_policy`) when the policy leaves either open
    for the PS, as a derived policy for real TDs does (the lab cannot predict their MR_TD)."""
    fields = policy.to_dict()
    pinned: dict[str, list[str]] = {}
    for name in _PINNED:
        values = policy.reference_for(ps_role, name)
        if values is not None:
            pinned[name] = list(values)
    fields.update(pinned)
    fields["roles"] = {ps_role: pinned}
    fields["report_data_binding"] = "key+nonce"
    release = AttestationPolicy.from_dict(fields)
    try:
        check_release_policy(release)
    except VaultError as error:
        raise VaultError(
            f"the run's attestation policy cannot guard the model volume: {error.message}",
            fix=f"pin {ps_role}'s mr_td and mr_config_id in your policy (hfl-lab attest policy "
            "--from-evidence on its evidence writes them), or run with -p vault=false.",
        ) from None
    return release


def _reference(measurements: TdMeasurements | Mapping[str, str]) -> dict[str, str]:
    summary = measurements if isinstance(measurements, Mapping) else measurements.summary()
    missing = [name for name in _PINNED if not summary.get(name)]
    if missing:
        raise VaultError(
            f"the measurements for the volume's release policy lack {', '.join(missing)}.",
            fix="pass TdMeasurements, or a mapping with hex 'mr_td' and 'mr_config_id'.",
        )
    return {name: summary[name] for name in _PINNED}


def check_release_policy(policy: AttestationPolicy) -> None:
    """Refuse a release policy that could hand the passphrase to a TD other than the PS's or the
    owner's: one naming another role, leaving MR_TD or MR_CONFIG_ID open, or allowing DEBUG."""
    others = sorted(role for role in policy.roles if not _MAY_RECEIVE.match(role))
    if others:
        raise VaultError(
            f"the volume's release policy names role(s) {', '.join(others)}, which would receive "
            "the volume passphrase; only the parameter server and the owner may.",
            fix="build it with hfl_lab.vault.volume_release_policy(ps_measurements, "
            "owner_measurements).",
        )
    if policy.allow_debug:
        raise VaultError(
            "the volume's release policy allows DEBUG TDs, whose memory the host can read: the "
            "passphrase would not stay secret.",
            fix="set allow_debug: false in the release policy.",
        )
    for role in (None, *sorted(policy.roles)):
        open_fields = [name for name in _PINNED if policy.reference_for(role, name) is None]
        if open_fields:
            who = f"role {role}" if role else "roles it does not name (e.g. worker0)"
            raise VaultError(
                f"the volume's release policy leaves {' and '.join(open_fields)} open ('any') "
                f"for {who}, so a TD running other code or another role's configuration would "
                "receive the passphrase.",
                fix="pin them to the PS's values, e.g. with "
                "hfl_lab.vault.volume_release_policy(ps_measurements, owner_measurements).",
            )


# -- the volume file, before any key is asked for -------------------------------------------------


def inspect_volume(path: Path | str) -> tuple[LuksHeader, int]:
    """The LUKS header and size of a volume file, checked without its key: a missing or
    truncated file is reported before anyone asks the key broker for the passphrase."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise VaultError(
            f"no volume file at {path}.",
            fix="provision it with provision_vault(...), or copy the volume file there.",
        ) from None
    if not path.is_file():
        raise VaultError(f"{path} is not a volume file.", fix="pass the path of the .luks file.")
    with path.open("rb") as stream:
        header = read_header(stream, size)
    data = header.data_size if header.data_size is not None else size - header.data_offset
    if data < _MIN_DATA_SEGMENT or data % 512:
        raise VaultError(
            f"the volume file {path.name} is truncated: its data segment is {data} bytes.",
            fix="copy the complete volume file again (compare its size with the original).",
        )
    return header, size


# -- the lab owner ------------------------------------------------------------------------------


def provision_vault(
    client: TrustClient,
    admin_token: bytes,
    vault_path: Path | str,
    *,
    size_mb: int,
    release_policy: AttestationPolicy,
    data_path: PathKind = "auto",
    reuse: bool = False,
    luks_version: int = 1,
    kdf_iterations: int | None = None,
    secret_name: str = VOLUME_SECRET_NAME,
) -> VaultInfo:
    """Create the LUKS volume with a fresh random passphrase and register that passphrase in the
    key broker under ``release_policy``; the passphrase is then dropped (no disk, no logs).

    An existing volume file is refused (its checkpoints would be locked out by a new passphrase)
    unless ``reuse=True``, which creates and registers nothing and describes the volume found.
    Registering replaces any passphrase registered before under ``secret_name``: one volume per
    name (pass another ``secret_name`` for a second volume).
    """
    path = Path(vault_path)
    check_release_policy(release_policy)
    if path.exists() or path.is_symlink():
        if not reuse:
            raise VaultError(
                f"{path} already exists; provisioning makes a new volume with a new passphrase, "
                "and the checkpoints in the existing one would be lost with its old passphrase.",
                fix="pass reuse=True to keep using it (its passphrase is already registered), "
                "or move the file away, or choose another vault_path.",
            )
        header, size = inspect_volume(path)
        log.info("reusing the existing volume %s (nothing created or registered)", path.name)
        return VaultInfo(path, header.uuid, choose_data_path(data_path), size, header.version,
                         created=False)

    # Python cannot wipe an immutable bytes object; the passphrase is held by this one name
    # only, passed by reference, and dropped as soon as the broker has it.
    passphrase = new_passphrase()
    with ModelVault.create(
        path, passphrase, size_mb, luks_version, data_path, kdf_iterations=kdf_iterations
    ) as vault:
        uuid, kind = vault.volume_uuid, vault.data_path_kind
    try:
        client.register_secret(DEFAULT_APP_ID, secret_name, passphrase, release_policy,
                               admin_token)
    except HflLabError as error:
        path.unlink(missing_ok=True)  # nobody could ever open it: the passphrase is gone
        raise VaultError(
            f"the key broker did not take the volume passphrase ({error.message}); the new "
            f"volume {path.name} was removed, since nothing could open it.",
            fix="check the admin token and that the trust service runs, then provision again.",
        ) from None
    finally:
        del passphrase
    log.info(
        "provisioned %s (LUKS%d, %d MB, %s data path); its passphrase is registered in the key "
        "broker as %s/%s and kept nowhere else",
        path.name, luks_version, size_mb, kind, DEFAULT_APP_ID, secret_name,
    )
    return VaultInfo(path, uuid, kind, path.stat().st_size, luks_version, created=True)


# -- the attested parameter server ---------------------------------------------------------------


def open_vault_for_ps(
    client: TrustClient,
    role: str,
    provider: EvidenceProvider,
    vault_path: Path | str,
    *,
    identity: RaTlsIdentity | None = None,
    data_path: PathKind = "auto",
    keep_last: int | None = None,
    secret_name: str = VOLUME_SECRET_NAME,
    create_size_mb: int = 0,
) -> ModelVault:
    """Obtain the passphrase by attested key release as ``role`` and open the volume for writing.

    The volume file is checked first, so a missing or truncated one costs no key release. A
    refusal raises ``PolicyViolation`` naming the failed policy checks; no volume is opened.
    With ``create_size_mb`` a missing volume is created with the released passphrase (the
    cluster way: the trust service generated that passphrase in its TD); an existing one is
    opened as usual, so a restarted PS finds its checkpoints.
    """
    path = Path(vault_path)
    create = create_size_mb > 0 and not (path.exists() or path.is_symlink())
    if not create:
        inspect_volume(path)
    passphrase = _attested_release(client, role, provider, identity, path, secret_name)
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            vault = ModelVault.create(path, passphrase, create_size_mb, 1, data_path,
                                      keep_last=keep_last)
        else:
            vault = ModelVault.open(path, passphrase, data_path, keep_last=keep_last)
    finally:
        del passphrase
    log.info("%s %s %s with the attested key release (%s data path)", role,
             f"created ({create_size_mb} MB) and opened" if create else "opened", path.name,
             vault.data_path_kind)
    return vault


# -- the owner's trusted node --------------------------------------------------------------------


def retrieve_as_owner(
    client: TrustClient | None,
    credential: OwnerCredential,
    vault_path: Path | str,
    trusted_ps_keys: Signers,
    *,
    identity: RaTlsIdentity | None = None,
    data_path: PathKind = "auto",
    require_provenance: bool = True,
    secret_name: str = VOLUME_SECRET_NAME,
) -> RetrievedModel:
    """Obtain the passphrase as the owner and return what ``retrieve_model`` returns.

    ``credential`` is the trusted node's ``EvidenceProvider`` (attested as role ``owner`` through
    ``client``), or a ``SealedBrokerState`` (authorized: the trust service's sealed state and the
    owner key; ``client`` may then be None). The volume is opened read-only and the provenance
    chain is verified before any weights are returned.
    """
    path = Path(vault_path)
    header, _ = inspect_volume(path)
    if isinstance(credential, SealedBrokerState):
        passphrase, state = _unseal_for_owner(credential, secret_name)
        recorded = _recorded_head(state, header.uuid, credential.state_path)
    elif not isinstance(credential, EvidenceProvider):
        raise VaultError(
            f"the owner's credential is a {type(credential).__name__}, which cannot obtain the "
            "volume passphrase.",
            fix="pass the trusted node's EvidenceProvider (attested as 'owner') or a "
            "SealedBrokerState (the trust service's sealed state and the owner key).",
        )
    elif client is None:
        raise VaultError(
            "attested retrieval needs a TrustClient connected to the trust service.",
            fix="pass TrustClient.connect(...), or a SealedBrokerState as the credential.",
        )
    else:
        passphrase = _attested_release(client, OWNER_ROLE, credential, identity, path,
                                       secret_name)
        recorded, _ = client.checkpoint_head(header.uuid)
    try:
        return retrieve_model(path, passphrase, trusted_ps_keys, path_kind=data_path,
                              require_provenance=require_provenance, recorded_head=recorded)
    finally:
        del passphrase


def open_as_owner(
    credential: SealedBrokerState,
    vault_path: Path | str,
    *,
    data_path: PathKind = "auto",
    secret_name: str = VOLUME_SECRET_NAME,
) -> ModelVault:
    """Open the volume read-only with the owner's authorized credential, to list and check
    every checkpoint (``retrieve_as_owner`` returns the newest one only)."""
    path = Path(vault_path)
    inspect_volume(path)
    passphrase = owner_passphrase(credential, secret_name)
    try:
        return ModelVault.open(path, passphrase, data_path, read_only=True)
    finally:
        del passphrase


def _attested_release(
    client: TrustClient,
    role: str,
    provider: EvidenceProvider,
    identity: RaTlsIdentity | None,
    path: Path,
    secret_name: str,
) -> bytes:
    try:
        return client.release_secret(DEFAULT_APP_ID, secret_name, role, provider, identity)
    except PolicyViolation as refusal:
        raise PolicyViolation(
            f"the key broker refused the passphrase of {path.name} to {role}, so the volume "
            f"stays closed: {refusal.message}",
            fix="run this in the TD the release policy names for this role (the parameter "
            "server, or the owner's trusted node as role 'owner'); the trust service's audit "
            "log has the full verdict.",
        ) from None


def owner_passphrase(credential: SealedBrokerState,
                     secret_name: str = VOLUME_SECRET_NAME) -> bytes:
    """The volume's passphrase, taken from the sealed trust-service state with the owner's
    credential (authorized, not attested; the owner's counter check applies). Keep it in memory
    only and ``del`` it when done, as :func:`open_as_owner` does."""
    return _unseal_for_owner(credential, secret_name)[0]


def _unseal_for_owner(
    credential: SealedBrokerState, secret_name: str
) -> tuple[bytes, dict[str, Any]]:
    """The passphrase and the whole unsealed state, after the owner's counter check."""
    try:
        state = unseal_state(credential.state_path, credential.owner_key)
    except AttestationError:
        raise unsealing_failed(credential.state_path) from None
    except FileNotFoundError:
        raise VaultError(
            f"no sealed trust-service state at {credential.state_path}.",
            fix="pass the state_path the trust service was started with.",
        ) from None
    if credential.counter_path is not None:
        OwnerCounter(credential.counter_path, credential.owner_key).advance(
            state_counter(state), f"the sealed state {credential.state_path.name}")
    # KeyBroker.export_state: "<app id>\0<name>" -> {"secret": hex, "policy": {...}}
    entry = state.get("broker", {}).get(f"{DEFAULT_APP_ID}\0{secret_name}")
    if not isinstance(entry, dict) or not isinstance(entry.get("secret"), str):
        raise VaultError(
            f"the sealed trust-service state holds no secret {DEFAULT_APP_ID}/{secret_name}.",
            fix="pass the state of the trust service the volume was provisioned with.",
        )
    log.info(  # expected on the owner's node; notebook 05's report says it in a row
        "volume passphrase taken from the sealed trust-service state with the owner key "
        "(authorized, not attested: this release is not in the trust service's audit log)"
    )
    return bytes.fromhex(entry["secret"]), state


def _recorded_head(state: dict[str, Any], volume_uuid: str, where: Path) -> CheckpointHead | None:
    raw = state.get(HEADS, {}).get(volume_uuid)
    if raw is None:
        return None
    try:
        return CheckpointHead.from_dict(raw)
    except (ValueError, KeyError, TypeError):
        raise VaultError(
            f"the sealed state {where.name} holds an unreadable checkpoint head for this volume.",
            fix="restore the trust service's sealed state from a good copy.",
        ) from None
