"""A small offline kustomize: the part of kustomize v5 that k8s/ uses, so the tests can render the
overlays without kubectl or a network.

Supported in a kustomization.yaml: `resources` (manifest files and directories holding their own
kustomization), `patches` (strategic merge, from `path` or inline `patch`, optionally with a
`target`), `namespace`, `labels` (with `includeTemplates`), `replicas` and `images`. Any other
field, or a patch directive it does not implement, is an error: the renderer never silently
renders something different from kustomize. `test_k8s.py` also compares its output with
`kubectl kustomize` where kubectl is installed.

Transformers run in kustomize's order: patches, namespace, labels, replicas, images.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "replicas", "images"}

# Kinds without a namespace (the ones a namespace transformer must leave alone).
CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
    "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService",
}
SCALABLE = {"Deployment", "ReplicaSet", "ReplicationController", "StatefulSet"}
POD_TEMPLATE_KINDS = {"Deployment", "ReplicaSet", "ReplicationController", "DaemonSet", "StatefulSet", "Job"}

# Strategic merge: list fields merged item by item on a key (the patchMergeKey of the Kubernetes
# API). A field can have several candidates (container ports vs Service ports); the first key the
# items carry wins. Lists not named here are replaced whole, as Kubernetes does for args, command,
# tolerations, accessModes...
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "hostAliases": ("ip",),
    "ports": ("containerPort", "port"),
}


class KustomizeError(Exception):
    pass


def render(directory: Path) -> list[Manifest]:
    """The manifests `kubectl kustomize <directory>` would print (as dicts, unordered)."""
    directory = Path(directory)
    kustomization = _load_kustomization(directory)
    manifests: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            manifests.extend(render(path))
        elif path.is_file():
            manifests.extend(load_manifests(path))
        else:
            raise KustomizeError(f"{directory}: resource {entry!r} not found")
    _refuse_duplicates(manifests, directory)

    for patch in kustomization.get("patches", []):
        _apply_patch(manifests, patch, directory)
    if "namespace" in kustomization:
        for manifest in manifests:
            if manifest["kind"] not in CLUSTER_SCOPED:
                manifest["metadata"]["namespace"] = kustomization["namespace"]
    for label_set in kustomization.get("labels", []):
        _apply_labels(manifests, label_set)
    for replica in kustomization.get("replicas", []):
        _apply_replicas(manifests, replica)
    for image in kustomization.get("images", []):
        _apply_image(manifests, image)
    return manifests


def load_manifests(path: Path) -> list[Manifest]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "name" not in doc.get("metadata", {}):
            raise KustomizeError(f"{path}: every document needs kind and metadata.name")
    return docs


def object_id(manifest: Manifest) -> tuple[str, str, str]:
    return manifest["kind"], manifest["metadata"].get("namespace", ""), manifest["metadata"]["name"]


def pod_specs(manifest: Manifest) -> list[Manifest]:
    """The pod specs inside a workload (or a Pod)."""
    kind, spec = manifest["kind"], manifest.get("spec", {})
    if kind == "Pod":
        return [spec]
    if kind in POD_TEMPLATE_KINDS:
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def _load_kustomization(directory: Path) -> Manifest:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {sorted(unsupported)}")
    return kustomization


def _refuse_duplicates(manifests: list[Manifest], directory: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for manifest in manifests:
        key = object_id(manifest)
        if key in seen:
            raise KustomizeError(f"{directory}: {key} defined twice")
        seen.add(key)


# ---- patches -------------------------------------------------------------------------------------

def _apply_patch(manifests: list[Manifest], entry: Manifest, directory: Path) -> None:
    if set(entry) - {"path", "patch", "target"}:
        raise KustomizeError(f"{directory}: unsupported patch options {sorted(set(entry))}")
    if "path" in entry:
        patch_docs = load_manifests(directory / entry["path"])
    elif "patch" in entry:
        patch_docs = [doc for doc in yaml.safe_load_all(entry["patch"]) if doc is not None]
    else:
        raise KustomizeError(f"{directory}: a patch needs `path` or `patch`")
    if any(isinstance(doc, list) for doc in patch_docs):
        raise KustomizeError(f"{directory}: JSON6902 patches are not implemented")

    for patch in patch_docs:
        if "target" in entry:
            targets = [m for m in manifests if _matches_target(m, entry["target"])]
        else:
            targets = [m for m in manifests
                       if m["kind"] == patch["kind"] and m["metadata"]["name"] == patch["metadata"]["name"]
                       and patch["metadata"].get("namespace") in (None, m["metadata"].get("namespace"))]
        if not targets:
            raise KustomizeError(f"{directory}: patch {entry} matches no resource")
        for target in targets:
            body = copy.deepcopy(patch)
            if "target" in entry:  # the patch's own name is a placeholder when a target is given
                body.pop("metadata", None)
            merged = strategic_merge(target, body)
            target.clear()
            target.update(merged)


def _matches_target(manifest: Manifest, target: Manifest) -> bool:
    unsupported = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unsupported:
        raise KustomizeError(f"patch target selectors not implemented: {sorted(unsupported)}")
    group, _, version = manifest["apiVersion"].rpartition("/")
    checks = {
        "kind": manifest["kind"], "name": manifest["metadata"]["name"],
        "namespace": manifest["metadata"].get("namespace", ""), "group": group, "version": version,
    }
    # kustomize treats target names (and the other fields) as anchored regular expressions.
    return all(re.fullmatch(str(pattern), checks[field]) for field, pattern in target.items())


def strategic_merge(original: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(patch, dict):
        if "$patch" in patch or any(str(key).startswith("$") for key in patch):
            raise KustomizeError(f"strategic merge directives are not implemented: {sorted(patch)}")
        if not isinstance(original, dict):
            return _without_nulls(patch)
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = _without_nulls(value)
        return merged
    if isinstance(patch, list) and isinstance(original, list) and field in MERGE_KEYS:
        key = next((k for k in MERGE_KEYS[field] if all(isinstance(i, dict) and k in i for i in patch)), None)
        if key is None:
            raise KustomizeError(f"items of {field} lack a merge key {MERGE_KEYS[field]}")
        # kustomize's order: the patch's items (merged into their originals) in patch order,
        # then the original items the patch does not name, in their original order.
        originals = {old.get(key): old for old in original if isinstance(old, dict)}
        named = {item[key] for item in patch}
        merged_list = [strategic_merge(originals[item[key]], item, field) if item[key] in originals
                       else _without_nulls(item) for item in patch]
        merged_list += [copy.deepcopy(old) for old in original
                        if not (isinstance(old, dict) and old.get(key) in named)]
        return merged_list
    return copy.deepcopy(patch)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---- labels, replicas, images --------------------------------------------------------------------

def _apply_labels(manifests: list[Manifest], label_set: Manifest) -> None:
    unsupported = set(label_set) - {"pairs", "includeTemplates", "includeSelectors"}
    if unsupported or label_set.get("includeSelectors"):
        raise KustomizeError(f"labels options not implemented: {label_set}")
    pairs = label_set["pairs"]
    for manifest in manifests:
        _merge_labels(manifest["metadata"], pairs)
        if not label_set.get("includeTemplates"):
            continue
        kind, spec = manifest["kind"], manifest.get("spec", {})
        if kind in POD_TEMPLATE_KINDS:
            _merge_labels(spec["template"].setdefault("metadata", {}), pairs)
        if kind == "StatefulSet":
            for claim in spec.get("volumeClaimTemplates", []):
                _merge_labels(claim.setdefault("metadata", {}), pairs)
        if kind == "CronJob":
            job = spec["jobTemplate"]
            _merge_labels(job.setdefault("metadata", {}), pairs)
            _merge_labels(job["spec"]["template"].setdefault("metadata", {}), pairs)


def _merge_labels(metadata: Manifest, pairs: dict[str, str]) -> None:
    metadata.setdefault("labels", {}).update(pairs)


def _apply_replicas(manifests: list[Manifest], replica: Manifest) -> None:
    targets = [m for m in manifests if m["kind"] in SCALABLE and m["metadata"]["name"] == replica["name"]]
    if not targets:
        raise KustomizeError(f"replicas: no scalable resource named {replica['name']!r}")
    for target in targets:
        target["spec"]["replicas"] = replica["count"]


_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    match = _IMAGE.match(image)
    if match is None:
        raise KustomizeError(f"unparseable image reference {image!r}")
    return match["name"], match["tag"], match["digest"]


def _apply_image(manifests: list[Manifest], rule: Manifest) -> None:
    unsupported = set(rule) - {"name", "newName", "newTag", "digest"}
    if unsupported:
        raise KustomizeError(f"images options not implemented: {sorted(unsupported)}")
    for manifest in manifests:
        for pod_spec in pod_specs(manifest):
            for container in pod_spec.get("initContainers", []) + pod_spec.get("containers", []):
                name, tag, digest = split_image(container["image"])
                if name != rule["name"]:
                    continue
                name = rule.get("newName", name)
                if "digest" in rule:
                    tag, digest = None, rule["digest"]
                elif "newTag" in rule:
                    tag, digest = rule["newTag"], None
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
