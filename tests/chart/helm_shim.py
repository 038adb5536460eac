"""A stand-in for the `helm` binary, enough to run chart/tests/*.sh offline.

This machine has no helm binary (and cannot build one), so the tests put a
`helm` wrapper on PATH that runs this file with the helm-python-sdk wheel,
which embeds Helm's own Go SDK (v4). Supported:

    helm template NAME CHART [-n|--namespace NS] [--api-versions V]...
                  [--kube-version V] [--set K=V]... [--set-string K=V]...
                  [-f|--values FILE]...
    helm version

`--api-versions` has no Python wrapper in helm-python-sdk 0.2.2, but the
library's render call accepts an `api_versions` option, which is what
`helm template --api-versions` feeds into .Capabilities.APIVersions. Output
is helm's: `---` + `# Source:` per non-empty template, NOTES.txt left out.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import helm_python
import yaml
from helm_python import _native


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def render(chart_dir: str, values: dict[str, Any] | None, *, name: str, namespace: str,
           api_versions: list[str] | None = None, kube_version: str | None = None) -> dict[str, str]:
    """Render like `helm template`, including --api-versions/--kube-version."""
    opts: dict[str, Any] = {"name": name, "namespace": namespace}
    if api_versions:
        opts["api_versions"] = list(api_versions)
    if kube_version:
        opts["kube_version"] = kube_version
    with helm_python.Chart.load(chart_dir) as chart:
        rendered = _native.call_string(
            "helm_render", chart._raw(),
            None if values is None else json.dumps(values), json.dumps(opts))
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def _template(args: list[str]) -> int:
    positional: list[str] = []
    values: dict[str, Any] = {}
    namespace = "default"
    api_versions: list[str] = []
    kube_version = None
    it = iter(args)
    for arg in it:
        flag, eq, inline = arg.partition("=")
        takes_value = flag in {"-n", "--namespace", "--api-versions", "-a", "--kube-version",
                               "--set", "--set-string", "-f", "--values"}
        value = (inline if eq else next(it, None)) if takes_value else None
        if takes_value and value is None:
            print(f"Error: flag needs an argument: {flag}", file=sys.stderr)
            return 1
        if flag in {"-n", "--namespace"}:
            namespace = value
        elif flag in {"--api-versions", "-a"}:
            api_versions.extend(v for v in value.split(",") if v)
        elif flag == "--kube-version":
            kube_version = value
        elif flag == "--set":
            deep_merge(values, helm_python.parse_set_string(value))
        elif flag == "--set-string":
            deep_merge(values, helm_python.parse_set_string_values(value))
        elif flag in {"-f", "--values"}:
            with open(value) as fh:
                deep_merge(values, yaml.safe_load(fh) or {})
        elif arg.startswith("-"):
            print(f"Error: unknown flag: {arg} (helm_shim)", file=sys.stderr)
            return 1
        else:
            positional.append(arg)
    if len(positional) != 2:
        print("Error: usage: helm template NAME CHART [flags]", file=sys.stderr)
        return 1
    name, chart_dir = positional
    try:
        manifests = render(chart_dir, values or None, name=name, namespace=namespace,
                           api_versions=api_versions, kube_version=kube_version)
    except helm_python.HelmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    for path in sorted(manifests):
        body = manifests[path].strip()
        if path.endswith("NOTES.txt") or not body:
            continue
        sys.stdout.write(f"---\n# Source: {path}\n{body}\n")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["template"]:
        return _template(argv[1:])
    if argv[:1] == ["version"]:
        print(f"helm-python-sdk {helm_python.__version__} (Helm SDK {helm_python.helm_sdk_version()})")
        return 0
    print(f"Error: helm_shim supports only `template` and `version`, not {argv[:1]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
