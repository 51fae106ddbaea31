"""``kustomize build`` of k8s/ and the run folders: kustomize itself (``kubectl kustomize`` or
the ``kustomize`` binary) where one is installed, else the lab's pure-Python renderer of the
subset of kustomize that k8s/ uses (:func:`build_builtin`).

The renderer's supported kustomization fields: ``resources`` (files and directories), ``namespace``,
``images``, ``replicas``, ``configMapGenerator`` (files, literals; behavior create, replace,
merge), ``generatorOptions.disableNameSuffixHash: true`` and ``patches`` whose patch is a
JSON 6902 operation list (inline or a file), with ``target`` selectors (group, version, kind,
name as an anchored regex, namespace). Transformers run in kustomize's order: patches,
namespace, replicas, images. Anything else is refused with ``ConfigError``, so the layout can
never silently mean something different to kustomize than to the lab. A test compares the
two renderings wherever kustomize is installed. The JSON patches are applied by the
``jsonpatch`` package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer
import yaml

from hfl_lab._exceptions import ConfigError

Manifest = dict[str, Any]

_SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "replicas",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}
_CLUSTER_SCOPED = {
    "Namespace",
    "RuntimeClass",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "IngressClass",
    "Node",
}
_SCALABLE = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}
_IMAGE_SPLIT = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]*))?(?:@(?P<digest>.+))?$")


#: how kustomize is run where one is installed (``kubectl kustomize`` or the binary)
_KUSTOMIZE_COMMANDS = (("kubectl", "kustomize"), ("kustomize", "build"))


def kustomize_command() -> list[str] | None:
    """The installed kustomize (``kubectl kustomize``, else ``kustomize build``), or None.

    ``HFL_LAB_KUSTOMIZE=builtin`` forces the lab's own renderer.
    """
    if os.environ.get("HFL_LAB_KUSTOMIZE") == "builtin":
        return None
    for program, verb in _KUSTOMIZE_COMMANDS:
        found = shutil.which(program)
        if found:
            return [found, verb]
    return None


def build(directory: Path) -> list[Manifest]:
    """The objects of the kustomization in ``directory``: rendered by kustomize itself where it
    is installed, else by the lab's own renderer of the subset the lab uses (:func:`build_builtin`,
    the same objects; a test compares the two)."""
    command = kustomize_command()
    if command is None:
        return build_builtin(directory)
    _kustomization_file(directory)  # the same error as the lab's renderer for a missing file
    try:
        result = subprocess.run([*command, str(directory)], capture_output=True, text=True,
                                timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{' '.join(command)} {directory} did not run ({exc}).",
                          fix="set HFL_LAB_KUSTOMIZE=builtin to use the lab's renderer.") from None
    if result.returncode != 0:
        raise ConfigError(
            f"{' '.join(command)} {directory} failed: {result.stderr.strip()[-500:]}",
            fix="fix the kustomization it names.",
        )
    try:
        return [obj for obj in yaml.safe_load_all(result.stdout) if obj]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{' '.join(command)} printed no valid YAML ({exc}).") from None


def build_builtin(directory: Path) -> list[Manifest]:
    """The objects ``kustomize build directory`` prints, for the kustomize subset the lab uses;
    without kustomize installed this is what :func:`build` runs."""
    path = _kustomization_file(directory)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); fix the file.") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} must be a mapping; fix the file.")
    unknown = sorted(set(spec) - _SUPPORTED)
    if unknown:
        raise ConfigError(
            f"{path} uses kustomize field(s) {', '.join(unknown)} that the lab's renderer "
            f"does not implement; use only {', '.join(sorted(_SUPPORTED))}."
        )
    objects: list[Manifest] = []
    for entry in spec.get("resources", []) or []:
        target = (directory / str(entry)).resolve()
        if target.is_dir():
            objects.extend(build_builtin(target))
        elif target.is_file():
            objects.extend(_load_documents(target))
        else:
            raise ConfigError(f"{path}: resource {entry!r} does not exist; fix the path.")
    _generate_config_maps(directory, spec, objects)
    for patch in spec.get("patches", []) or []:
        _apply_patch_entry(directory, patch, objects)
    if spec.get("namespace"):
        _set_namespace(objects, str(spec["namespace"]))
    for rep in spec.get("replicas", []) or []:
        _set_replicas(objects, rep)
    for image in spec.get("images", []) or []:
        _set_image(objects, image)
    return objects


def apply_patch(doc: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    """``doc`` with the RFC 6902 ``operations`` applied (a new object; the ``jsonpatch``
    package does the work); ``ConfigError`` naming the failed operation otherwise."""
    try:
        patched: dict[str, Any] = jsonpatch.apply_patch(doc, operations)
    except jsonpatch.JsonPatchTestFailed as e:
        raise ConfigError(
            f"JSON patch test failed: {e}; the base changed, update the overlay."
        ) from None
    except jsonpatch.InvalidJsonPatch as e:
        raise ConfigError(f"JSON patch {operations!r} is not valid: {e}.") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
        raise ConfigError(
            f"JSON patch failed: {e}; the path is out of range or missing in the base, "
            "fix the overlay."
        ) from None
    return patched


def _kustomization_file(directory: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(f"no kustomization.yaml in {directory}; point the lab at a k8s/ folder.")


def _load_documents(path: Path) -> list[Manifest]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); fix the file.") from None
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise ConfigError(f"{path} holds a document that is not a Kubernetes object.")
    return docs


def _generate_config_maps(directory: Path, spec: dict[str, Any], objects: list[Manifest]) -> None:
    generators = spec.get("configMapGenerator", []) or []
    if not generators:
        return
    options = spec.get("generatorOptions") or {}
    if set(options) - {"disableNameSuffixHash"} or options.get("disableNameSuffixHash") is not True:
        raise ConfigError(
            f"{directory}: the lab's renderer needs generatorOptions with exactly "
            "disableNameSuffixHash: true (stable ConfigMap names)."
        )
    for gen in generators:
        unknown = set(gen) - {"name", "files", "literals", "behavior"}
        if unknown:
            raise ConfigError(
                f"{directory}: configMapGenerator field(s) {sorted(unknown)} unsupported."
            )
        data: dict[str, str] = {}
        for item in gen.get("files", []) or []:
            key, _, rel = str(item).rpartition("=")
            source = directory / rel
            data[key or Path(rel).name] = source.read_text()
        for item in gen.get("literals", []) or []:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise ConfigError(f"{directory}: literal {item!r} needs the form key=value.")
            data[key] = value
        behavior = gen.get("behavior", "create")
        name = str(gen["name"])
        existing = [
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name
        ]
        if behavior == "create":
            if existing:
                raise ConfigError(f"{directory}: ConfigMap {name} exists; use behavior: replace.")
            objects.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
            )
        elif behavior in ("replace", "merge"):
            if len(existing) != 1:
                raise ConfigError(f"{directory}: no ConfigMap {name} to {behavior}.")
            if behavior == "replace":
                existing[0]["data"] = data
            else:
                existing[0].setdefault("data", {}).update(data)
        else:
            raise ConfigError(f"{directory}: configMapGenerator behavior {behavior!r} unknown.")


def _matches(obj: Manifest, target: dict[str, Any]) -> bool:
    group, _, version = str(obj["apiVersion"]).rpartition("/")
    checks = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"].get("name", ""),
        "namespace": obj["metadata"].get("namespace", ""),
    }
    unknown = set(target) - set(checks)
    if unknown:
        raise ConfigError(f"patch target field(s) {sorted(unknown)} are not supported.")
    return all(re.fullmatch(str(target[k]), checks[k]) is not None for k in target)


def _apply_patch_entry(directory: Path, entry: dict[str, Any], objects: list[Manifest]) -> None:
    if "patch" in entry:
        text = str(entry["patch"])
    elif "path" in entry:
        text = (directory / str(entry["path"])).read_text()
    else:
        raise ConfigError(f"{directory}: a patches entry needs 'patch' or 'path'.")
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise ConfigError(
            f"{directory}: only JSON 6902 patches (a list of operations) are supported; "
            "rewrite the strategic-merge patch as operations."
        )
    target = entry.get("target")
    if not isinstance(target, dict):
        raise ConfigError(f"{directory}: a JSON 6902 patch needs a target.")
    selected = [i for i, o in enumerate(objects) if _matches(o, target)]
    if not selected:
        raise ConfigError(f"{directory}: patch target {target} matches no object.")
    for i in selected:
        objects[i] = apply_patch(objects[i], ops)


def _set_namespace(objects: list[Manifest], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
        elif obj["kind"] not in _CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace


def _set_replicas(objects: list[Manifest], rep: dict[str, Any]) -> None:
    found = False
    for obj in objects:
        if obj["kind"] in _SCALABLE and obj["metadata"]["name"] == rep["name"]:
            obj.setdefault("spec", {})["replicas"] = int(rep["count"])
            found = True
    if not found:
        raise ConfigError(f"replicas: no workload named {rep['name']!r} to scale.")


def _set_image(objects: list[Manifest], image: dict[str, Any]) -> None:
    for obj in objects:
        for container in _containers(obj):
            match = _IMAGE_SPLIT.match(str(container.get("image", "")))
            if match is None or match["name"] != image["name"]:
                continue
            name = image.get("newName", match["name"])
            tag = image.get("newTag", match["tag"])
            digest = image.get("digest", match["digest"])
            if "digest" in image:
                tag = None  # kustomize drops the tag when it pins a digest
            ref = str(name)
            if tag:
                ref += f":{tag}"
            if digest:
                ref += f"@{digest}"
            container["image"] = ref


def _containers(obj: Manifest) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") if "template" in spec else spec
    if not isinstance(pod, dict):
        return []
    out: list[dict[str, Any]] = []
    for key in ("initContainers", "containers"):
        out.extend(pod.get(key) or [])
    return out


def image_name(reference: str) -> str:
    """The part of an image reference kustomize's ``images[].name`` matches (no tag/digest)."""
    match = _IMAGE_SPLIT.match(reference)
    if match is None:
        raise ConfigError(f"image {reference!r} cannot be parsed; fix the manifest.")
    return match["name"]
