"""The attestation policy: which TDs the lab trusts, loaded from YAML/JSON and validated."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hfl_lab import owner
from hfl_lab._exceptions import ConfigError, PolicyViolation

ANY = "any"
#: the owner's signature of a policy file sits beside it, with this suffix
SIGNATURE_SUFFIX = ".sig"

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
_HEX_SIZES = {"mr_td": 48, "mr_seam": 48, "mr_config_id": 48, "xfam": 8}
_HEX_SIZES.update({f"rtmr{i}": 48 for i in range(4)})
#: the fields that hold reference values ("any" or a list), also settable per role
_REFERENCE_FIELDS = (*_HEX_SIZES, "td_attributes")
BINDINGS = ("none", "key", "key+nonce")


def _values(name: str, raw: Any) -> tuple[str, ...] | None:
    """A reference-value field: "any" (unchecked) or one or more hex strings of the right size."""
    if raw is None or raw == ANY:
        return None
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"policy field '{name}' must be \"any\", a hex string or a list of them")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"policy field '{name}' holds {item!r}, which is not a hex string")
        value = item.lower().removeprefix("0x")
        try:
            size = len(bytes.fromhex(value))
        except ValueError:
            raise ConfigError(f"policy field '{name}': '{item}' is not hex") from None
        if size != _HEX_SIZES[name]:
            raise ConfigError(
                f"policy field '{name}': '{item[:16]}…' is {size} bytes, "
                f"expected {_HEX_SIZES[name]}"
            )
        out.append(value)
    return tuple(out)


def _attribute_values(raw: Any) -> tuple[str, ...] | None:
    """``td_attributes``: "any" or one or more 64-bit values, as hex strings (or integers, as
    YAML reads an unquoted 0x…), kept as ``0x`` and 16 digits: the form verdicts show."""
    if raw is None or raw == ANY:
        return None
    items = raw if isinstance(raw, list | tuple) else [raw]
    if not items:
        raise ConfigError("policy field 'td_attributes' must be \"any\", a hex value or a list")
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                value = int(item.lower().removeprefix("0x"), 16)
            except ValueError:
                raise ConfigError(f"policy field 'td_attributes': '{item}' is not hex") from None
        elif isinstance(item, int) and not isinstance(item, bool):
            value = item
        else:
            raise ConfigError(f"policy field 'td_attributes' holds {item!r}, not a hex value")
        if not 0 <= value < 1 << 64:
            raise ConfigError(f"policy field 'td_attributes': '{item}' does not fit in 64 bits")
        out.append(f"0x{value:016x}")
    return tuple(out)


def _reference(name: str, raw: Any) -> tuple[str, ...] | None:
    return _attribute_values(raw) if name == "td_attributes" else _values(name, raw)


@dataclass(frozen=True)
class AttestationPolicy:
    """Reference values and rules a TD's evidence must satisfy. ``None`` means "any"."""

    tee_type: str = "TDX"
    mr_td: tuple[str, ...] | None = None
    rtmr0: tuple[str, ...] | None = None
    rtmr1: tuple[str, ...] | None = None
    rtmr2: tuple[str, ...] | None = None
    rtmr3: tuple[str, ...] | None = None
    mr_seam: tuple[str, ...] | None = None
    mr_config_id: tuple[str, ...] | None = None
    xfam: tuple[str, ...] | None = None
    #: the exact TD attributes (one of these 64-bit values, as ``attest show`` and verdicts
    #: print them: 0x0000000010000000 is SEPT_VE_DISABLE alone); the forbidden bits apply too
    td_attributes: tuple[str, ...] | None = None
    #: TD attribute bits that must be clear; default: DEBUG and every other bit of 7:0
    forbidden_td_attributes: int = 0xFF
    allow_debug: bool = False
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    accepted_advisory_ids: tuple[str, ...] = ()
    #: the lowest ``tcbEvaluationDataNumber`` the collateral may carry (Intel raises it with every
    #: TCB recovery): older, still validly signed collateral is refused; None: any
    min_tcb_evaluation_data_number: int | None = None
    #: where verifiers fetch their own collateral for real evidence (a PCCS or Intel's PCS);
    #: None: they need a collateral file. Collateral that comes with evidence is never used.
    pccs_url: str | None = None
    #: seconds; applies when the evidence is bound to a challenge whose issue time is known
    max_evidence_age_s: float = 300.0
    #: what REPORTDATA must bind: nothing, the TLS key, or the key and the verifier's nonce
    report_data_binding: str = "none"
    allow_simulated: bool = False
    #: per-role reference values (role → {field: values}); roles not listed use the defaults
    roles: dict[str, dict[str, tuple[str, ...] | None]] = field(default_factory=dict)

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any) -> AttestationPolicy:
        if not isinstance(raw, dict):
            raise ConfigError("an attestation policy must be a mapping of field: value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"unknown policy field(s) {', '.join(unknown)}; valid fields: "
                + ", ".join(sorted(known))
            )
        kw: dict[str, Any] = {}
        for name, value in raw.items():
            if name in _REFERENCE_FIELDS:
                kw[name] = _reference(name, value)
            elif name == "roles":
                kw[name] = cls._roles(value)
            else:
                kw[name] = value
        policy = cls(**kw)
        policy._validate()
        return policy

    @staticmethod
    def _roles(raw: Any) -> dict[str, dict[str, tuple[str, ...] | None]]:
        if not isinstance(raw, dict):
            raise ConfigError("policy field 'roles' must map role names to reference values")
        out = {}
        for role, fields in raw.items():
            if not isinstance(fields, dict) or set(fields) - set(_REFERENCE_FIELDS):
                raise ConfigError(
                    f"policy roles.{role} may only set {', '.join(sorted(_REFERENCE_FIELDS))}"
                )
            out[str(role)] = {k: _reference(k, v) for k, v in fields.items()}
        return out

    def _validate(self) -> None:
        if self.tee_type != "TDX":
            raise ConfigError(f"policy tee_type '{self.tee_type}' is not supported; use TDX")
        bad = [s for s in self.accepted_tcb_statuses if s not in TCB_STATUSES]
        if bad or isinstance(self.accepted_tcb_statuses, str):
            raise ConfigError(
                f"accepted_tcb_statuses holds unknown {bad or self.accepted_tcb_statuses}; "
                f"valid: {', '.join(TCB_STATUSES)}"
            )
        if self.report_data_binding not in BINDINGS:
            raise ConfigError(
                f"report_data_binding '{self.report_data_binding}' is not one of {BINDINGS}"
            )
        for name in ("allow_debug", "allow_simulated"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"policy field '{name}' must be true or false")
        if not isinstance(self.forbidden_td_attributes, int):
            raise ConfigError("forbidden_td_attributes must be an integer bit mask")
        if not isinstance(self.max_evidence_age_s, int | float) or self.max_evidence_age_s <= 0:
            raise ConfigError("max_evidence_age_s must be a positive number of seconds")
        minimum = self.min_tcb_evaluation_data_number
        if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, int)
                                    or minimum < 0):
            raise ConfigError(
                f"min_tcb_evaluation_data_number must be a whole number ≥ 0, got {minimum!r}",
                fix="use the tcbEvaluationDataNumber of Intel's current TCB info (e.g. 17)",
            )
        if self.pccs_url is not None and (
            not isinstance(self.pccs_url, str) or not self.pccs_url.startswith("https://")
        ):
            raise ConfigError(
                f"pccs_url must be an https:// URL, got {self.pccs_url!r}",
                fix="use your PCCS (e.g. https://pccs.example:8081) or Intel's "
                "https://api.trustedservices.intel.com",
            )
        object.__setattr__(self, "accepted_tcb_statuses", tuple(self.accepted_tcb_statuses))
        object.__setattr__(self, "accepted_advisory_ids", tuple(self.accepted_advisory_ids))

    @classmethod
    def load(cls, path: str | Path) -> AttestationPolicy:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read policy file {p}: {e.strerror}") from None
        try:
            raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"policy file {p} is not valid YAML/JSON: {e}") from None
        return cls.from_dict(raw)

    # -- saving -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _REFERENCE_FIELDS:
                out[f.name] = ANY if value is None else list(value)
            elif f.name == "roles":
                out[f.name] = {
                    r: {k: ANY if v is None else list(v) for k, v in fs.items()}
                    for r, fs in value.items()
                }
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def load_signed(cls, path: str | Path, key_hex: str) -> AttestationPolicy:
        """The policy at ``path``, only if ``path`` + ``.sig`` is the owner's signature (key
        ``key_hex``) over its exact bytes: a policy swapped on its way to a TD is refused."""
        p = Path(path)
        fix = ("let the backend write the run's policy (it signs it with the owner's key), or "
               "sign your own policy in the same session; then find who changed the file")
        try:
            data = p.read_bytes()
            signature = bytes.fromhex(p.with_name(p.name + SIGNATURE_SUFFIX).read_text().strip())
        except OSError as e:
            raise ConfigError(f"cannot read the policy {p} and its signature: {e.strerror}.",
                              fix=fix) from None
        except ValueError:
            raise ConfigError(f"the signature of the policy {p} is not hex.", fix=fix) from None
        if not owner.policy_signature_valid(key_hex, data, signature):
            raise ConfigError(
                f"the policy {p} is not signed by the owner whose key this TD's configuration "
                "names: it was changed after the owner signed it, or comes from elsewhere.",
                fix=fix,
            )
        return cls.from_dict(yaml.safe_load(data.decode()) if p.suffix != ".json"
                             else json.loads(data))

    def save_signed(self, path: str | Path, key: Ed25519PrivateKey) -> None:
        """Save, and write the owner's signature over the file's bytes beside it (``.sig``)."""
        self.save(path)
        sign_file(path, key)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        text = (
            json.dumps(self.to_dict(), indent=2)
            if p.suffix == ".json"
            else yaml.safe_dump(self.to_dict(), sort_keys=False)
        )
        p.write_text(text)

    def reference_for(self, role: str | None, name: str) -> tuple[str, ...] | None:
        """The reference values of ``name`` for ``role``: the role's own, else the default."""
        if role is not None and role in self.roles and name in self.roles[role]:
            return self.roles[role][name]
        value: tuple[str, ...] | None = getattr(self, name)
        return value

    def require_role(self, role: str | None, what: str) -> str:
        """``role``, when this policy names it; else ``PolicyViolation``. The defaults are
        what the roles share (the lab's MR_TD): judged by them alone, any TD running the lab's
        code would pass as a role the policy never described (issue 18, item 6)."""
        if role and role in self.roles:
            return role
        named = ", ".join(sorted(self.roles)) or "none"
        raise PolicyViolation(
            f"{what}: role: the policy names no role {role or '(none)'!r} (it names {named}), "
            "so there are no reference values to hold its evidence to",
            fix=f"ask as one of the roles the policy names, or give {role or 'the role'} its "
            f"own entry (roles.{role or '<role>'}: mr_config_id, ...) in the policy",
        )

    def replace(self, **changes: Any) -> AttestationPolicy:
        return dataclasses.replace(self, **changes)


def baseline_policy() -> AttestationPolicy:
    """What ``hfl-lab attest verify`` uses without ``--policy``: genuine, current, no DEBUG."""
    return AttestationPolicy()


def sign_file(path: str | Path, key: Ed25519PrivateKey) -> None:
    """The owner's signature over ``path``'s exact bytes, written beside it (``.sig``, hex)."""
    p = Path(path)
    p.with_name(p.name + SIGNATURE_SUFFIX).write_text(key.sign(p.read_bytes()).hex() + "\n")
