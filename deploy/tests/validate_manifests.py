"""Validates deploy/'s manifests (run by `cargo xtask validate-manifests`, in a venv with
kubernetes-validate from PyPI).

1. Renders every kustomization under deploy/ with a small renderer of the kustomize features
   the manifests use (resources, namespace, images, configMapGenerator with files or envs, and
   generatorOptions.disableNameSuffixHash; anything else is an error), and checks that every
   manifest and generator file is referenced by a kustomization. When `kubectl` is installed,
   `kubectl kustomize` must render the same objects.
2. Validates every rendered object against the Kubernetes JSON schema of KUBE_VERSION, strictly
   (unknown fields are errors).
3. Checks every container that runs `detector`: each `--flag` in its args exists in
   `detector <subcommand> --help` of the given binary, and every `$(VAR)` is defined by the
   container's env or by a ConfigMap it loads with envFrom. Likewise the reproducer's flags
   against `reproducer.py <role> --help`.
4. Checks the conventions every pod template must follow (the `kubernetes.io/os: linux` node
   selector; `automountServiceAccountToken` said explicitly, and on only with a service
   account of its own), that each Service selects a pod template and targets one of its ports,
   that each Prometheus operator object (no Kubernetes schema: a CRD) selects a Service and
   names one of its ports, and that the race timing is consistent (REPRODUCER_IDLE >
   TEST_TIMEOUT).

Prints one line per check and `manifests: N passed, N failed`; exits 1 on any failure.
"""

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import yaml

import kubernetes_validate
from kubernetes_validate.utils import (
    InvalidSchemaError,
    SchemaNotFoundError,
    ValidationError,
    VersionNotSupportedError,
)

KUBE_VERSION = "1.31.0"
KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator",
              "generatorOptions"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
# API groups of CRDs (no schema in kubernetes-validate): checked by check_crd_object instead.
CRD_GROUPS = {"monitoring.coreos.com"}


class RenderError(Exception):
    pass


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, what):
        self.passed += 1
        print(f"PASS {what}")

    def fail(self, what, why):
        self.failed += 1
        print(f"FAIL {what}: {why}")


def rel(path, root):
    return os.path.relpath(path, root)


def render(kdir, used):
    """Objects of kustomization `kdir`, each as (object, source file). Records every file it
    reads in `used`."""
    kfile = os.path.join(kdir, "kustomization.yaml")
    if not os.path.exists(kfile):
        raise RenderError(f"{kdir} has no kustomization.yaml")
    used.add(os.path.realpath(kfile))
    with open(kfile) as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise RenderError(f"{kfile}: unsupported kustomization keys {sorted(unknown)} "
                          "(extend deploy/tests/validate_manifests.py's renderer)")
    out = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(kdir, r))
        if os.path.isdir(p):
            out.extend(render(p, used))
        elif os.path.isfile(p):
            used.add(os.path.realpath(p))
            with open(p) as f:
                for doc in yaml.safe_load_all(f):
                    if doc is not None:
                        out.append((doc, p))
        else:
            raise RenderError(f"{kfile}: resource {r} does not exist")
    no_hash = (k.get("generatorOptions") or {}).get("disableNameSuffixHash", False)
    for g in k.get("configMapGenerator", []):
        if set(g) - {"name", "namespace", "files", "envs"}:
            raise RenderError(f"{kfile}: unsupported configMapGenerator keys {sorted(set(g))}")
        if not no_hash:
            raise RenderError(f"{kfile}: generators need generatorOptions.disableNameSuffixHash "
                              "(the manifests name the ConfigMaps)")
        data = {}
        for fname in g.get("files", []):
            p = os.path.normpath(os.path.join(kdir, fname))
            if not os.path.realpath(p).startswith(os.path.realpath(kdir) + os.sep):
                raise RenderError(f"{kfile}: {fname} is outside the kustomization's directory")
            used.add(os.path.realpath(p))
            with open(p) as f:
                data[os.path.basename(fname)] = f.read()
        for fname in g.get("envs", []):
            p = os.path.normpath(os.path.join(kdir, fname))
            if not os.path.realpath(p).startswith(os.path.realpath(kdir) + os.sep):
                raise RenderError(f"{kfile}: {fname} is outside the kustomization's directory")
            used.add(os.path.realpath(p))
            data.update(env_file(p))
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]},
              "data": data}
        if "namespace" in g:
            cm["metadata"]["namespace"] = g["namespace"]
        out.append((cm, kfile))
    ns = k.get("namespace")
    if ns:
        for obj, src in out:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = ns
            elif obj["kind"] in CLUSTER_SCOPED:
                raise RenderError(f"{kfile}: namespace: with cluster-scoped {obj['kind']} "
                                  "(the renderer does not rewrite subjects)")
            else:
                obj["metadata"]["namespace"] = ns
    for img in k.get("images", []):
        for obj, _ in out:
            for c in containers(obj):
                name = c.get("image", "")
                base = re.split(r"[:@]", name, maxsplit=1)[0]
                if base == img["name"]:
                    c["image"] = f"{img.get('newName', base)}:{img['newTag']}" \
                        if "newTag" in img else img.get("newName", base)
    return out


def env_file(path):
    """KEY=VALUE lines, as kustomize reads a configMapGenerator's `envs` (# comments, blanks)."""
    data = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise RenderError(f"{path}:{n}: not KEY=VALUE: {line}")
            data[key] = value
    return data


def pod_spec(obj):
    spec = obj.get("spec", {})
    return spec.get("template", {}).get("spec") if "template" in spec else None


def check_pod_conventions(obj, res, where):
    pod = pod_spec(obj)
    if pod is None:
        return
    os_sel = (pod.get("nodeSelector") or {}).get("kubernetes.io/os")
    if os_sel != "linux":
        res.fail(f"{where} nodeSelector", f"kubernetes.io/os is {os_sel!r}, not 'linux'")
    else:
        res.ok(f"{where} nodeSelector: kubernetes.io/os: linux")
    automount = pod.get("automountServiceAccountToken")
    if automount is None:
        res.fail(f"{where} token", "automountServiceAccountToken is not set (say true only "
                 "where the pod calls the API server)")
    elif automount and pod.get("serviceAccountName", "default") == "default":
        res.fail(f"{where} token", "mounts the default service account's token")
    else:
        res.ok(f"{where} token: automountServiceAccountToken: {str(automount).lower()}")


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_cross_objects(objs, res):
    """Services against pod templates, CRD objects against Services, the race timing."""
    def same_ns(a, b):
        return a["metadata"].get("namespace") == b["metadata"].get("namespace")

    for svc in (o for o in objs if o["kind"] == "Service"):
        where = f"Service {svc['metadata'].get('namespace')}/{svc['metadata']['name']}"
        pods = [o for o in objs if pod_spec(o) is not None and same_ns(o, svc) and labels_match(
            svc["spec"].get("selector", {}), o["spec"]["template"]["metadata"].get("labels", {}))]
        if not pods:
            res.fail(where, "selects no pod template")
            continue
        ports = {p.get("containerPort") for o in pods for c in containers(o) for p in c.get("ports", [])}
        ports |= {p.get("name") for o in pods for c in containers(o) for p in c.get("ports", [])}
        wrong = [p.get("targetPort", p["port"]) for p in svc["spec"]["ports"]
                 if p.get("targetPort", p["port"]) not in ports]
        if wrong:
            res.fail(where, f"targetPort {wrong} is no containerPort of {pods[0]['metadata']['name']}")
        else:
            res.ok(f"{where}: selects {pods[0]['kind']} {pods[0]['metadata']['name']} and its ports")
    for mon in (o for o in objs if o["apiVersion"].split("/")[0] in CRD_GROUPS):
        where = f"{mon['kind']} {mon['metadata'].get('namespace')}/{mon['metadata']['name']}"
        if mon["kind"] != "ServiceMonitor":
            res.fail(where, "only ServiceMonitor is checked (extend check_cross_objects)")
            continue
        sel = mon["spec"].get("selector", {}).get("matchLabels", {})
        svcs = [o for o in objs if o["kind"] == "Service" and same_ns(o, mon)
                and labels_match(sel, o["metadata"].get("labels", {}))]
        names = {p.get("name") for s in svcs for p in s["spec"]["ports"]}
        wrong = [e.get("port") for e in mon["spec"].get("endpoints", []) if e.get("port") not in names]
        if not svcs or wrong or not mon["spec"].get("endpoints"):
            res.fail(where, f"selects {len(svcs)} Services; endpoint ports not among their port "
                     f"names {sorted(n for n in names if n)}: {wrong}")
        else:
            res.ok(f"{where}: selects Service {svcs[0]['metadata']['name']}, port {names}")
    for cm in (o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "race-timing"):
        where = f"ConfigMap {cm['metadata'].get('namespace', '-')}/race-timing"
        d = cm.get("data", {})
        try:
            idle, timeout, period = (int(d[k]) for k in
                                     ("REPRODUCER_IDLE", "TEST_TIMEOUT", "AGENT_CLEANUP_PERIOD"))
        except (KeyError, ValueError) as e:
            res.fail(where, f"needs whole seconds for REPRODUCER_IDLE, TEST_TIMEOUT, "
                     f"AGENT_CLEANUP_PERIOD: {e}")
            continue
        if idle <= timeout or min(idle, timeout, period) <= 0:
            res.fail(where, f"REPRODUCER_IDLE={idle} must exceed TEST_TIMEOUT={timeout} (the "
                     "kernel's entries must expire during the idle time)")
        else:
            res.ok(f"{where}: REPRODUCER_IDLE {idle} s > TEST_TIMEOUT {timeout} s")


def containers(obj):
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") if "template" in spec else None
    if pod is None:
        return []
    return pod.get("initContainers", []) + pod.get("containers", [])


def canonical(objs):
    return sorted(json.dumps(o, sort_keys=True) for o in objs)


def kubectl_render(kdir):
    r = subprocess.run(["kubectl", "kustomize", kdir], capture_output=True, text=True)
    if r.returncode != 0:
        raise RenderError(f"kubectl kustomize {kdir}: {r.stderr.strip()}")
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None]


def help_flags(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RenderError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", r.stdout))


def check_container(obj, c, rendered, detector, repro, res, where):
    """Flags and $(VAR)s of one container that runs detector or the reproducer."""
    argv = list(c.get("command", [])) + list(c.get("args", []))
    image = c.get("image", "")
    if any(a.endswith("reproducer.py") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.endswith("reproducer.py"))
        role, rest = argv[i + 1], argv[i + 2:]
        help_cmd = [sys.executable, repro, role, "--help"]
        label = f"reproducer.py {role}"
    elif "detector" in image.rsplit("/", 1)[-1] or (argv and argv[0].endswith("detector")):
        rest = argv[1:] if argv and argv[0].endswith("detector") else argv
        sub = [a for a in rest if not a.startswith("-")][:1]
        if not sub:
            res.fail(where, "the detector container names no subcommand")
            return
        help_cmd = [detector, sub[0], "--help"]
        label = f"detector {sub[0]}"
    else:
        return
    try:
        known = help_flags(help_cmd)
    except RenderError as e:
        res.fail(where, str(e))
        return
    flags = [a.split("=", 1)[0] for a in rest if a.startswith("--")]
    missing = [f for f in flags if f not in known]
    if missing:
        res.fail(f"{where} flags", f"{', '.join(missing)} not in `{label} --help` "
                 f"({' '.join(help_cmd[:1])})")
    else:
        res.ok(f"{where} flags: {len(flags)} flags all in `{label} --help`")
    # $(VAR) references: Kubernetes expands them only from the container's environment.
    defined = {e["name"] for e in c.get("env", [])}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        ns = obj["metadata"].get("namespace")
        cms = [o for o, _ in rendered if o["kind"] == "ConfigMap"
               and o["metadata"]["name"] == ref and o["metadata"].get("namespace") == ns]
        for cm in cms:
            defined |= set(cm.get("data", {}))
    refs = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(argv)))
    undefined = sorted(refs - defined)
    if undefined:
        res.fail(f"{where} variables", f"$({'), $('.join(undefined)}) not defined by env or envFrom")
    elif refs:
        res.ok(f"{where} variables: {len(refs)} $(VAR) references all defined")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deploy", required=True, help="the deploy/ directory")
    ap.add_argument("--detector", required=True, help="the detector binary whose --help is checked")
    args = ap.parse_args()
    root = os.path.dirname(os.path.abspath(args.deploy))
    deploy = os.path.abspath(args.deploy)
    repro = os.path.join(deploy, "lab", "reproducer.py")
    res = Results()
    print(f"validating against the Kubernetes {KUBE_VERSION} schema (kubernetes-validate "
          f"{kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}, strict)")

    kdirs = sorted(d for d, _, files in os.walk(deploy) if "kustomization.yaml" in files)
    used = set()
    # Every kustomization's objects, by identity (a kustomization included by another is
    # rendered in both).
    everything = {}
    have_kubectl = shutil.which("kubectl") is not None
    for kdir in kdirs:
        name = rel(kdir, root)
        try:
            rendered = render(kdir, used)
        except (RenderError, yaml.YAMLError, KeyError) as e:
            res.fail(f"render {name}", str(e))
            continue
        res.ok(f"render {name}: {len(rendered)} objects")
        if have_kubectl:
            try:
                theirs = kubectl_render(kdir)
                if canonical(theirs) == canonical([o for o, _ in rendered]):
                    res.ok(f"render {name}: `kubectl kustomize` renders the same {len(theirs)} objects")
                else:
                    res.fail(f"render {name}", "`kubectl kustomize` renders different objects")
            except RenderError as e:
                res.fail(f"render {name}", str(e))
        for obj, src in rendered:
            md = obj.get("metadata", {})
            what = f"{name}: {obj.get('kind')} {md.get('namespace', '-')}/{md.get('name')} ({rel(src, root)})"
            everything[(obj.get("kind"), md.get("namespace"), md.get("name"))] = obj
            check_pod_conventions(obj, res, what)
            if obj.get("apiVersion", "").split("/")[0] in CRD_GROUPS:
                # No schema to validate against: check_cross_objects checks what it refers to.
                continue
            try:
                kubernetes_validate.validate(copy.deepcopy(obj), KUBE_VERSION, strict=True)
                res.ok(what)
            except ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                res.fail(what, f"{path}: {e.message}")
            except (SchemaNotFoundError, VersionNotSupportedError, InvalidSchemaError) as e:
                res.fail(what, e.message)
            for c in containers(obj):
                check_container(obj, c, rendered, args.detector, repro, res,
                                f"{what} container {c.get('name')}")

    check_cross_objects(list(everything.values()), res)

    # Every manifest and generator input must be part of some kustomization.
    skip_dirs = {os.path.join(deploy, "tests")}
    unreferenced = []
    for d, dirs, files in os.walk(deploy):
        dirs[:] = [x for x in dirs if os.path.join(d, x) not in skip_dirs and x != "__pycache__"]
        for f in files:
            p = os.path.join(d, f)
            if f.endswith((".yaml", ".yml", ".sh", ".py", ".env", ".json")) and os.path.realpath(p) not in used:
                unreferenced.append(rel(p, root))
    if unreferenced:
        res.fail("references", f"not referenced by any kustomization: {', '.join(sorted(unreferenced))}")
    else:
        res.ok(f"references: every manifest and script under {rel(deploy, root)}/ is in a kustomization")

    print(f"manifests: {res.passed} passed, {res.failed} failed")
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
