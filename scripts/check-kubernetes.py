#!/usr/bin/env python3
"""Renders the Kubernetes manifests in deploy/kubernetes (the base and each
overlay, as `kubectl kustomize` would for the features they use: resources,
namespace, images, strategic-merge patches) and checks them offline:

- every rendered object against Kubernetes' own JSON schemas, strictly
  (the `kubernetes-validate` package, which bundles them);
- against the gpuwasm they run: every `gpuwasm serve` flag in a container's
  args and every GPUWASM_* setting in the ConfigMap is one that
  `gpuwasm serve --help` lists; probes reach `/health` on a declared port;
  the Service targets a declared port; the autoscaler scales the Deployment
  on a metric the server's /metrics exports; the grace period covers the
  drain and the preStop pause.

Usage:
  check-kubernetes.py --serve-help FILE --metrics FILE [--kubernetes VERSION]
  check-kubernetes.py --render DIR      (prints DIR rendered, for kubectl apply -f -)

tests/scale_out.rs runs the check with the help text and a /metrics scrape
of a real server. Needs PyYAML and kubernetes-validate (target/venv).
"""

import argparse
import copy
import os
import re
import sys

import yaml
import kubernetes_validate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy", "kubernetes")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def load_all(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def merge(base, patch):
    """Strategic merge as kustomize does it for these manifests: maps merge,
    lists of named maps merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = lambda items: isinstance(items, list) and items and all(isinstance(i, dict) and "name" in i for i in items)
    if named(base) and named(patch):
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            match = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(patch)


def render(directory):
    """The objects the kustomization in `directory` produces."""
    kustomization = load_all(os.path.join(directory, "kustomization.yaml"))[0]
    known = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    unknown = set(kustomization) - known
    if unknown:
        raise SystemExit(f"{directory}/kustomization.yaml: this renderer does not know {sorted(unknown)}")
    objects = []
    for resource in kustomization.get("resources", []):
        path = os.path.normpath(os.path.join(directory, resource))
        objects += render(path) if os.path.isdir(path) else load_all(path)
    for patch in kustomization.get("patches", []):
        for change in load_all(os.path.join(directory, patch["path"])):
            targets = [i for i, o in enumerate(objects) if o["kind"] == change["kind"] and o["metadata"]["name"] == change["metadata"]["name"]]
            if len(targets) != 1:
                raise SystemExit(f"{directory}: patch {patch['path']} matches {len(targets)} objects")
            objects[targets[0]] = merge(objects[targets[0]], change)
    if "namespace" in kustomization:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for o in objects:
            for container in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def overlays():
    out = [os.path.join(ROOT, "base")]
    overlay_root = os.path.join(ROOT, "overlays")
    out += [os.path.join(overlay_root, d) for d in sorted(os.listdir(overlay_root))]
    return out


def check(objects, where, serve_help, metric_names, version):
    failures = []
    fail = lambda message: failures.append(f"{where}: {message}")
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{o['kind']}/{o['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    # Options as clap lists them: at the start of a line, after any short form.
    flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", serve_help, re.M))
    settings = set(re.findall(r"env: (GPUWASM_[A-Z_]+)=", serve_help))
    for config in by_kind.get("ConfigMap", []):
        for key in config.get("data", {}):
            if key.startswith("GPUWASM_") and key not in settings:
                fail(f"ConfigMap {config['metadata']['name']}: {key} is not a setting of `gpuwasm serve`")
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        fail(f"{len(deployments)} Deployments, expected 1")
        return failures
    deployment = deployments[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    if args[0] != "serve":
        fail(f"the container runs `gpuwasm {args[0]}`, not `serve`")
    for arg in args:
        if arg.startswith("--") and arg not in flags:
            fail(f"`gpuwasm serve` has no flag {arg}")
    def value(flag):
        if flag not in args[:-1]:
            fail(f"the container's args lack {flag}")
            return None
        return args[args.index(flag) + 1]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen = value("--listen")
    if listen and int(listen.rsplit(":", 1)[1]) != ports.get("http"):
        fail(f"--listen {listen} is not the `http` port {ports.get('http')}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        if get["path"] != "/health" or get["port"] not in ports:
            fail(f"{probe} asks {get['path']} on port {get['port']}")
    drain = int(value("--drain-secs") or 0)
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if pod["terminationGracePeriodSeconds"] <= drain + pause:
        fail(f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} does not cover --drain-secs {drain} + preStop {pause}")
    for service in by_kind.get("Service", []):
        for port in service["spec"]["ports"]:
            if port["targetPort"] not in ports:
                fail(f"Service {service['metadata']['name']} targets port {port['targetPort']}, which the container does not declare")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        if hpa["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
            fail(f"HorizontalPodAutoscaler scales {hpa['spec']['scaleTargetRef']['name']}")
        for metric in hpa["spec"]["metrics"]:
            name = metric["pods"]["metric"]["name"]
            if name not in metric_names:
                fail(f"HorizontalPodAutoscaler scales on {name}, which /metrics does not export")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-help")
    parser.add_argument("--metrics")
    parser.add_argument("--kubernetes", default="1.33.0", help="Kubernetes version to validate against")
    parser.add_argument("--render")
    args = parser.parse_args()
    if args.render:
        yaml.safe_dump_all(render(args.render), sys.stdout, sort_keys=False)
        return
    if not (args.serve_help and args.metrics):
        parser.error("give --serve-help and --metrics (or --render DIR)")
    serve_help = open(args.serve_help).read()
    metric_names = set(re.findall(r"^# TYPE (\S+) ", open(args.metrics).read(), re.M))
    failures = []
    for directory in overlays():
        objects = render(directory)
        failures += check(objects, os.path.relpath(directory, ROOT), serve_help, metric_names, args.kubernetes)
        print(f"{os.path.relpath(directory, ROOT)}: {len(objects)} objects rendered and checked against Kubernetes {args.kubernetes}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
