"""Notebook 03: build and measure the trainer image, and derive the policy's reference values.

On ``local`` the workload image is made for real (:mod:`hfl_lab.image`): umoci builds an OCI
image from exactly the files the simulated TD's MR_TD measures, skopeo encrypts its layers for
a key pair made in memory, pushes it to a ``docker-registry`` on loopback (TLS from a lab CA)
and signs it with a GPG key made for the run, and a pull through the ``signedBy`` policy
verifies, decrypts and unpacks it, and the unpacked files are measured again. Each step is a
row with its command, time and digest; the layers' media types are shown before and after
encryption. Where the tools are missing, the step says so and names ``make system-deps``. The
reference values come from the measurement through ``hfl-lab attest policy
--from-evidence``'s function, then are checked with ``hfl-lab attest verify``'s. On
``kubernetes`` the full image of native/image/Dockerfile goes through the same steps into the
user's registry (``image``) where buildah or docker can build it here; otherwise each step says
why it was skipped and what it would run. On both, where ``cosign`` is installed the pushed image
is signed with cosign too and a ``sigstoreSigned`` policy is written; where it is not, the step
says so and prints the commands.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ImageError
from hfl_lab.attestation import policy_from_evidence, policy_text, verify_evidence
from hfl_lab.backends.kubernetes import image as tools
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.backends.kubernetes.workload_image import BUILD_TIMEOUT_S, publish_cluster_image
from hfl_lab.config import LabConfig
from hfl_lab.image import (
    SYSTEM_DEPS_FIX,
    LabRegistry,
    LayerKey,
    PublishedImage,
    PulledImage,
    ToolRecord,
    ToolRunner,
    missing_tools,
    publish_workload_image,
    pull_image,
    require_tools,
)
from hfl_lab.image.container import BUILDERS, DOCKERFILE, build_commands, find_builder
from hfl_lab.image.cosign import command_line as cosign_line
from hfl_lab.image.cosign import cosign_sign, pinned_reference
from hfl_lab.lab.notebook import Table
from hfl_lab.lab.trust import OWNER_ROLE, VerdictView, lab_roles
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.providers.simulated import SimulatedTdProvider
from hfl_lab.tee.sim.measure import (
    TdMeasurements,
    measure_workload,
    source_files,
    workload_digest,
)
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.tee.verdict import Verdict

__all__ = ["ImageReport", "ImageStep", "cosign_step", "measure_image"]

_REPO = Path(__file__).resolve().parents[2]
LOCAL_RUNTIME = (
    "the image holds the workload's code only: on backend=local the participants run in "
    "SIMULATED TDs with the lab's own Python and packages"
)
LOCAL_NOT_PULLED = (
    "at the start of training (notebook 04, workload_image=auto|on) the backend publishes the "
    "run's own image with a fresh layer key into the same image/ folder, and ps0 and the "
    "workers pull that one with the key released to their attested TDs"
)


@dataclass(frozen=True)
class ImageStep:
    """One step of making the image: done, skipped (with why) or planned, and its command."""

    name: str
    status: str
    detail: str
    command: str = ""
    digest: str = ""
    seconds: float | None = None

    @classmethod
    def from_record(cls, record: ToolRecord, detail: str = "") -> ImageStep:
        return cls(record.step, "done", detail, record.command_line, record.digest,
                   record.seconds)


@dataclass
class ImageReport:
    """What was built and measured, the derived reference values and their check."""

    backend: str
    steps: list[ImageStep]
    measurements: dict[str, TdMeasurements]
    policy: AttestationPolicy
    policy_text: str
    verdict: Verdict | None = None
    files: dict[str, str] = field(default_factory=dict)
    published: PublishedImage | None = None
    #: kubernetes: the layer key this publication is encrypted for, in memory only (the
    #: backend publishes the run's own image at start and registers that key itself; pass
    #: this one to ``KubernetesBackend.register_layer_key`` to deploy this publication)
    layer_key: LayerKey | None = field(default=None, repr=False)

    def timings(self) -> dict[str, float]:
        """Seconds to make the image (build to verify) and to pull it (pull + unpack), and its
        layers' bytes; empty when no image was made."""
        made = [s for s in self.steps if s.seconds is not None and s.name != "registry"]
        pull = sum(s.seconds or 0.0 for s in made if s.name in ("pull", "unpack"))
        if self.published is None or not made:
            return {}
        return {"build_encrypt_push_sign_verify_s": round(sum(s.seconds or 0.0 for s in made)
                                                          - pull, 3),
                "pull_verify_decrypt_unpack_s": round(pull, 3),
                "image_bytes": float(self.published.encrypted.size)}

    def table(self) -> Table:
        table = Table(("step", "status", "seconds", "digest", "detail", "command"),
                      title="the trainer image")
        for s in self.steps:
            color = {"done": "#dafbe1", "failed": "#ffebe9"}.get(s.status, "")
            seconds = f"{s.seconds:.3f}" if s.seconds is not None else ""
            table.add(s.name, s.status.upper(), seconds, _short_digest(s.digest), s.detail,
                      s.command, color=color)
        return table

    def layers_table(self) -> Table | None:
        """The layers' media types before and after encryption (None: no image was built)."""
        if self.published is None:
            return None
        t = self.timings()
        table = Table(("image", "manifest", "layer media type", "bytes"),
                      title="layers before and after encryption",
                      note="the registry and image/oci/ hold only the encrypted layers. Build "
                      f"+ encrypt + push + sign + verify: {t['build_encrypt_push_sign_verify_s']}"
                      f" s; pull + verify + decrypt + unpack: {t['pull_verify_decrypt_unpack_s']}"
                      " s.")
        for name, image in (("built (plain)", self.published.plain),
                            ("pushed (encrypted, signed)", self.published.encrypted)):
            for layer in image.layers:
                table.add(name, _short_digest(image.manifest_digest), layer.media_type,
                          layer.size)
        return table

    def measurements_table(self) -> Table:
        table = Table(
            ("role", "MR_TD", "MR_CONFIG_ID", "RTMR0", "RTMR1", "RTMR2", "RTMR3"),
            title="measurements per role (what each TD will report)",
            note="MR_TD: the workload code (the same for every role); MR_CONFIG_ID and RTMR3: "
            "the role's configuration; RTMR0-2: virtual hardware, runtime, command line.",
        )
        for role, m in self.measurements.items():
            table.add(role, *(_short(v) for v in [m.mr_td, m.mr_config_id, *m.rtmrs]))
        return table

    def verdict_view(self) -> VerdictView | None:
        if self.verdict is None:
            return None
        return VerdictView(self.verdict, "the reference TD under the derived policy")

    def _tables(self) -> list[Table]:
        layers = self.layers_table()
        return [self.table(), *([layers] if layers is not None else []),
                self.measurements_table()]

    def __repr__(self) -> str:
        return "\n\n".join(t.to_text() for t in self._tables())

    def _repr_html_(self) -> str:
        return "".join(t._repr_html_() for t in self._tables())

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "steps": [s.__dict__ for s in self.steps],
            "measurements": {r: m.summary() for r, m in self.measurements.items()},
            "policy": self.policy.to_dict(),
            "reference_accepted": self.verdict.accepted if self.verdict is not None else None,
            "files": self.files,
            "pipeline": self.published.to_dict() if self.published is not None else None,
            "timings": self.timings(),
        }


def _short(value: bytes) -> str:
    text = value.hex()
    return f"{text[:12]}…{text[-4:]}"


def _short_digest(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    return f"{algorithm}:{value[:12]}…" if value else digest


def _tree_step() -> ImageStep:
    files = source_files(_REPO)
    size = sum(f.stat().st_size for f in files)
    return ImageStep(
        "workload image",
        "done",
        f"{len(files)} source files of trainer/ and hfl_lab/, {size / 1024:.0f} KiB, "
        "hashed into MR_TD",
    )


def _cluster_pipeline(
    config: LabConfig, out: Path, runner: ToolRunner | None = None,
) -> tuple[list[ImageStep], PublishedImage | None, LayerKey | None]:
    """On ``kubernetes``: the full image from native/image/Dockerfile through the same steps
    as the local one, into the user's registry (``image``), where buildah or docker can build
    it here; else each step skipped, saying why and what it would run."""
    settings = KubernetesSettings.from_config(config)
    runner = runner or ToolRunner(timeout_s=BUILD_TIMEOUT_S)
    try:
        builder = find_builder()
        require_tools("skopeo", "gpg", "gpgconf")
    except ImageError as error:
        return [*_cluster_plan(settings, out, error), *cosign_step(None, out)], None, None
    key = LayerKey()
    published = publish_cluster_image(settings, out, key, root=_REPO, runner=runner,
                                      builder=builder)
    details = {
        "build: image": f"{builder}: {DOCKERFILE}, the participants' full image (Python, "
        "TensorFlow, the lab)",
        "build": "the built image as an OCI layout (image/build/, removed once encrypted)",
        "encrypt": "skopeo: each layer encrypted (JWE) for a key made in memory; at the start "
        "of training the backend publishes the run's own image with a fresh key and registers "
        "it in the provisioned trust service for ps0 and the workers",
        "push and sign": f"skopeo: pushed to {published.source.reference} and signed (GPG "
        "simple signing, key made for this run); signature in image/signatures/",
        "verify": "skopeo through image/policy.json into image/oci/",
    }
    steps = [ImageStep.from_record(r, details.get(r.step, "")) for r in runner.records]
    steps.append(ImageStep(
        "pin the run", "done", "the run deploys this digest; the encrypted+signed overlay's "
        "initdata (MRCONFIGID) pins it", "", published.source.digest))
    return [*steps, *cosign_step(published, out)], published, key


def _cluster_plan(settings: KubernetesSettings, out: Path, why: ImageError) -> list[ImageStep]:
    layout = out / "build"
    commands = [shlex.join(argv) for name in BUILDERS
                for _, argv in build_commands(name, _REPO, layout)]
    target = settings.image
    trustee = tools.encrypt_command(target, f"{target}-encrypted", Path("image.key"),
                                    "hfl-lab")
    return [
        ImageStep("build", "skipped", f"{why.message} Fix: {why.fix}", " ; ".join(commands)),
        ImageStep("encrypt, push, sign, verify", "skipped",
                  "needs the built image; then the same skopeo steps as the local image, into "
                  f"{settings.registry_host or 'the registry of image'}",
                  "hfl_lab.backends.kubernetes.workload_image.publish_cluster_image"),
        ImageStep("image key in Trustee (CoCo guests)", "planned",
                  "for guests whose image-rs asks Trustee's KBS for the key: encrypt with "
                  "coco-keyprovider and register the key as kbs:///default/image_key/hfl-lab "
                  "(k8s/README.md, 'The image key in Trustee')", shlex.join(trustee)),
    ]


def _local_pipeline(out: Path) -> tuple[list[ImageStep], PublishedImage | None]:
    """Build, encrypt, push, sign, verify, then pull as a participant does; the registry runs
    for this step only and is stopped at its end (its storage stays in ``image/registry/``)."""
    missing = missing_tools()
    if missing:
        return [ImageStep("encrypted, signed image", "skipped",
                          f"{', '.join(missing)} not installed here: {SYSTEM_DEPS_FIX}",
                          "make system-deps"), *cosign_step(None, out)], None
    runner = ToolRunner()
    key = LayerKey()
    with LabRegistry(out / "registry", runner) as registry:
        registry.start()
        published = publish_workload_image(out, registry, key.public_pem, root=_REPO,
                                           runner=runner)
        pulled = pull_image(published.source, key.private_pem(), out / "pull-check",
                            who="the owner's check", runner=runner)
        cosign = cosign_step(published, out)  # while the registry serves
    del key
    labels = published.plain.config.get("config", {}).get("Labels") or {}
    files = labels.get("io.hfl-lab.workload.files", "?")
    details = {
        "registry": f"docker-registry on {registry.address}, TLS from a lab CA made in memory "
        "(digest: the CA certificate); stopped at the end of this step",
        "build": f"umoci, rootless: the {files} files MR_TD measures, under /app, entrypoint "
        f"python -m trainer; {LOCAL_RUNTIME}",
        "encrypt": "skopeo: each layer encrypted (JWE, ECDH-ES+A256KW) for a P-384 key made in "
        "memory; its private half is for the trust service's key broker only",
        "push and sign": f"skopeo: pushed and signed (GPG simple signing, key "
        f"{published.fingerprint[-16:]} made for this run, its keyring removed after this "
        "step); signature in image/signatures/",
        "verify": "skopeo through image/policy.json (signedBy the run's key, all else refused) "
        "into image/oci/, the encrypted image an outsider can check",
        "pull": "as a participant's TD: verified, decrypted with the layer key (an in-memory "
        f"fd; here the owner's copy, on a run the trust service's attested release); "
        f"{LOCAL_NOT_PULLED}",
        "unpack": "umoci unpack --rootless into the participant's folder",
        "build: layout": "umoci: a new OCI layout (image/build/, removed once encrypted)",
        "build: insert the workload": "umoci: one layer, file times fixed",
        "sign: key": "gpg: the run's signing key, in a temporary keyring (memory-backed "
        "/dev/shm where there is one)",
    }
    steps = [ImageStep.from_record(r, details.get(r.step, "")) for r in runner.records]
    same = workload_digest(pulled.workload_root) == workload_digest(_REPO)
    steps.append(_measured_pull_step(pulled, same))
    shutil.rmtree(out / "pull-check", ignore_errors=True)  # decrypted code: not kept
    return [*steps, *cosign], published


def _measured_pull_step(pulled: PulledImage, same: bool) -> ImageStep:
    digest = "mr_td:" + measure_workload(role="ps0", root=pulled.workload_root).mr_td.hex()
    if same:
        return ImageStep("measure the pulled workload", "done",
                         "MR_TD of the unpacked files equals the reference's", "", digest)
    return ImageStep("measure the pulled workload", "failed",
                     "the unpacked files differ from this checkout: a participant running "
                     "them would be refused", "", digest)


def cosign_step(published: PublishedImage | None, out: Path,
                 runner: ToolRunner | None = None) -> list[ImageStep]:
    """Where cosign is installed, sign the pushed image with it too and write the
    ``sigstoreSigned`` policy; where it is not, say so and print the exact commands."""
    if published is None:
        commands = cosign_line("<registry>/<repository>@<digest>", Path("cosign.pub"))
        return [ImageStep("sign (cosign)", "skipped", "no image was pushed to sign", commands)]
    runner = runner or ToolRunner()
    try:
        signature = cosign_sign(published, out, runner)
    except ImageError as error:
        if shutil.which("cosign") is not None:
            raise
        pinned = pinned_reference(published.source.reference, published.source.digest)
        commands = cosign_line(pinned, out / "cosign.pub")
        return [ImageStep("sign (cosign)", "skipped", f"{error.message} Fix: {error.fix}",
                          commands)]
    details = {"cosign: key": "cosign: a key pair for this run (password in memory, key "
               "file in a temporary folder removed after signing)",
               "sign (cosign)": f"signed {signature.pinned}; the signature is in the registry",
               "verify (cosign)": "cosign verify with cosign.pub; policy-sigstore.json "
               "(sigstoreSigned) written"}
    return [ImageStep.from_record(r, details.get(r.step, "")) for r in runner.records
            if r.step in details]


def measure_image(config: LabConfig, *, folder: str | Path | None = None) -> ImageReport:
    """Measure every role, derive the reference policy from the evidence, check it accepts;
    on ``local`` also make the workload image for real (see the module's docstring)."""
    out = (Path(folder) if folder is not None else Path(config.run_dir) / "image").resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = {"run_dir": str(Path(config.run_dir).resolve()), "workers": config.workers}
    roles = [*lab_roles(config), OWNER_ROLE]
    measurements = {role: measure_workload(role=role, config=run) for role in roles}
    published: PublishedImage | None = None
    layer_key: LayerKey | None = None
    if config.backend == "local":
        pipeline, published = _local_pipeline(out)
    else:
        pipeline, published, layer_key = _cluster_pipeline(config, out)
    steps = [_tree_step(), *pipeline]

    # The reference TD: ps0, as the simulated TD reports it; the same functions as the CLI's.
    platform = SimulatedPlatform.generate()
    evidence = SimulatedTdProvider(platform, measurements["ps0"]).get_evidence(b"reference")
    policy = policy_from_evidence(evidence)
    text = policy_text(policy, origin="the simulated ps0 TD of this lab (notebook 03)")
    verdict = verify_evidence(evidence, policy, lab_root=platform.root_der)
    verdict.verifier, verdict.subject = "lab", "ps0 (reference)"

    files = {
        "reference_policy": str(out / "reference_policy.yaml"),
        "measurements": str(out / "measurements.json"),
        "event_log": str(out / "event_log.json"),
    }
    Path(files["reference_policy"]).write_text(text, encoding="utf-8")
    Path(files["measurements"]).write_text(
        json.dumps({r: m.summary() for r, m in measurements.items()}, indent=2) + "\n"
    )
    Path(files["event_log"]).write_text(
        json.dumps({r: [e.__dict__ for e in m.events] for r, m in measurements.items()},
                   indent=2) + "\n"
    )
    if published is not None:
        files.update({f"image_{k}": v for k, v in published.files.items()})
        files["pipeline"] = str(out / "pipeline.json")
    report = ImageReport(config.backend, steps, measurements, policy, text, verdict, files,
                         published, layer_key)
    (out / "image.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
