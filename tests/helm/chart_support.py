"""Helpers of tests/helm/test_chart.py: rendering the chart with helm and
picking documents, containers and flags out of what it renders."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llmos"
VALUES_CPU = CHART / "values-cpu.yaml"
VALUES_GPU = CHART / "values-gpu.yaml"
VALUE_SETS = {
    "default": [],
    "cpu": [VALUES_CPU],
    "gpu": [VALUES_GPU],
}
RELEASE = "llmos"
NAMESPACE = "llmos-test"

# The chart's kubeVersion is ">=1.28.0-0": every minor from 1.28 up to the
# newest kubernetes-validate ships schemas for is validated.
MIN_KUBE = (1, 28)

# Everything optional switched on (NetworkPolicy, ServiceMonitor with a key, KEDA).
ALL_OPTIONAL = {
    "auth": {"metricsNeedKey": True},
    "networkPolicy": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}},
    "autoscaling": {"enabled": True, "kind": "keda"},
    "worker": {"preStop": {"enabled": True}},
    "modelStorage": {"type": "pvc", "pvc": {"claimName": "llmos-models"}},
}


def helm_bin() -> str:
    path = shutil.which("helm")
    if path is None:
        pytest.fail(
            "helm is not on PATH: run `bash scripts/helm-tools.sh` and add "
            "its bin directory (`eval \"$(bash scripts/helm-tools.sh --print-env)\"`)",
            pytrace=False,
        )
    return path


def values_args(files=(), values=None, tmpdir=None) -> list[str]:
    args = []
    for f in files:
        args += ["-f", str(f)]
    if values is not None:
        path = Path(tmpdir) / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    return args


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=120)


def render_text(files=(), values=None, release=RELEASE, namespace=NAMESPACE, extra=()) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        r = run_helm("template", release, str(CHART), "--namespace", namespace,
                     *values_args(files, values, tmp), *extra)
    assert r.returncode == 0, f"helm template failed:\n{r.stderr}"
    return r.stdout


def render(files=(), values=None, **kw) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(files, values, **kw)) if d]


def render_error(files=(), values=None) -> str:
    """Renders values that must be refused; returns helm's error text."""
    with tempfile.TemporaryDirectory() as tmp:
        r = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                     *values_args(files, values, tmp))
    assert r.returncode != 0, f"helm template accepted values it should refuse: {values}"
    return r.stderr


def kinds(docs, kind) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    names = [f'{d["kind"]}/{d["metadata"]["name"]}' for d in docs]
    assert len(found) == 1, f"expected one {kind}/{name}, rendered: {names}"
    return found[0]


def container(workload: dict) -> dict:
    spec = workload["spec"]["template"]["spec"] if "template" in workload["spec"] else workload["spec"]
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"] if "template" in workload["spec"] else workload["spec"]


def flag(args: list[str], name: str) -> str | None:
    """Value of `--name=value` in args (None when absent; fails when repeated)."""
    hits = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(hits) <= 1, f"--{name} given {len(hits)} times: {args}"
    return hits[0] if hits else None


def env_of(c: dict) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


def coord_name(release=RELEASE) -> str:
    return f"{release}-coordinator"


def pools(docs) -> dict[str, dict]:
    """Worker StatefulSets by their llmos.io/pool label."""
    out = {}
    for s in kinds(docs, "StatefulSet"):
        pool = s["metadata"]["labels"].get("llmos.io/pool")
        if pool is not None:
            out[pool] = s
    return out


def values_yaml_keys() -> list[tuple[str, bool, int, bool]]:
    """(dotted path, documented, line number, has child keys) for every key
    of values.yaml outside a documented key's value (a `# --` comment right
    above a key documents it and everything inside it)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z0-9_.\-/]+):(.*)$")
    out, stack, documented_indent = [], [], None
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m.group(1))
        if documented_indent is not None and indent > documented_indent:
            continue
        documented_indent = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --")
        if out and len(stack) > 1 and out[-1][0] == ".".join(k for _, k in stack[:-1]):
            out[-1] = (*out[-1][:3], True)
        out.append((".".join(k for _, k in stack), documented, i + 1, False))
        if documented:
            documented_indent = indent
    return out


# ---------------------------------------------------------------- X.509 (openssl)


def openssl_bin() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("openssl is not on PATH: the certificate checks read the rendered PEM with `openssl x509`",
                    pytrace=False)
    return path


def openssl(*args: str, stdin: bytes) -> str:
    r = subprocess.run([openssl_bin(), *args], input=stdin, capture_output=True, timeout=30)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr.decode()}"
    return r.stdout.decode()


def x509(pem: bytes) -> dict:
    """What a PEM certificate says: subject, notBefore/notAfter (as
    datetimes), its subject alternative names (["DNS:...", ...]), extended
    key usages, and whether it is a CA."""
    from datetime import datetime, timezone

    out = openssl("x509", "-noout", "-subject", "-dates",
                  "-ext", "subjectAltName,extendedKeyUsage,basicConstraints", stdin=pem)
    info = {"san": [], "eku": [], "ca": False}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        value = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.startswith("subject="):
            info["subject"] = line.split("=", 1)[1].strip()
        elif line.startswith(("notBefore=", "notAfter=")):
            k, v = line.split("=", 1)
            info[k] = datetime.strptime(" ".join(v.split()), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=timezone.utc)
        elif line.startswith("X509v3 Subject Alternative Name"):
            info["san"] = [n.strip() for n in value.split(",")]
        elif line.startswith("X509v3 Extended Key Usage"):
            info["eku"] = [n.strip() for n in value.split(",")]
        elif line.startswith("X509v3 Basic Constraints"):
            info["ca"] = "CA:TRUE" in value
    return info


def chains_to(cert: bytes, ca: bytes) -> bool:
    """Whether `openssl verify` accepts `cert` with `ca` as the only trusted root."""
    with tempfile.TemporaryDirectory() as tmp:
        ca_path, cert_path = Path(tmp) / "ca.crt", Path(tmp) / "cert.crt"
        ca_path.write_bytes(ca)
        cert_path.write_bytes(cert)
        r = subprocess.run([openssl_bin(), "verify", "-CAfile", str(ca_path), str(cert_path)],
                           capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and r.stdout.strip().endswith(": OK")


def key_matches(cert: bytes, key: bytes) -> bool:
    """Whether `key` is the private key of `cert` (same public key)."""
    return openssl("x509", "-noout", "-pubkey", stdin=cert) == openssl("pkey", "-pubout", stdin=key)
