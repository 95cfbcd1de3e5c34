"""Offline checks of the Helm chart helm/llmos.

Run (after `bash scripts/helm-tools.sh`, which installs helm, kubectl and the
Python packages):

    eval "$(bash scripts/helm-tools.sh --print-env)"
    "$LLMOS_CACHE/venv/bin/python" -m pytest -q tests/helm/test_chart.py

What they check:
  - `helm lint --strict` with the default, CPU and GPU values;
  - every document `helm template` renders (default, CPU, GPU values, API
    keys off, and one with every optional feature on), validated against the Kubernetes
    API schemas of kubernetes-validate (strict: unknown fields fail) for each
    Kubernetes minor the chart claims (kubeVersion >=1.28); kinds of CRDs
    (KEDA's ScaledObject, the Prometheus operator's ServiceMonitor and
    PodMonitor) have no schema there and are counted and printed, never
    skipped silently;
  - template tests over the parsed YAML: Raft peers and PodDisruptionBudget
    for 1, 3 and 5 coordinators, worker pool flags/labels/resources, the
    models list handed to `llmos apply`, the `helm test` pod, the API keys
    (the admin key's Secret, the coordinators' --admin-key-file, the CLI pods'
    LLMOS_API_KEY; an existing Secret; auth off), the internal plane's mutual
    TLS (the generated CA and certificates, parsed with `openssl x509`: DNS
    SANs, key usages, chain, keys; the mounts and --tls-* flags; a Secret of
    the user's or cert-manager's; --insecure), the optional resources, the
    security context;
  - values.schema.json and the chart's own checks reject bad values with a
    message naming the value.
No network is used: helm renders locally and the schemas ship in the package.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile

import pytest
import yaml

from chart_support import (
    ALL_OPTIONAL, CHART, MIN_KUBE, NAMESPACE, RELEASE, ROOT, VALUE_SETS, VALUES_CPU, VALUES_GPU,
    values_args, chains_to, container, coord_name, env_of, flag, key_matches, kinds, one, pod_spec,
    pools, render, render_error, render_text, run_helm, values_yaml_keys, x509,
)


@pytest.fixture(scope="module", autouse=True)
def helm_home(tmp_path_factory):
    """Keeps helm's config, cache and data out of the user's home; no cluster."""
    home = tmp_path_factory.mktemp("helm-home")
    saved = {k: os.environ.get(k) for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME", "KUBECONFIG")}
    os.environ["HELM_CACHE_HOME"] = str(home / "cache")
    os.environ["HELM_CONFIG_HOME"] = str(home / "config")
    os.environ["HELM_DATA_HOME"] = str(home / "data")
    # No cluster: nothing may be contacted.
    os.environ["KUBECONFIG"] = str(home / "no-kubeconfig")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ---------------------------------------------------------------- lint


VALIDATION_SETS = {
    "default": ([], None),
    "cpu": ([VALUES_CPU], None),
    "gpu": ([VALUES_GPU], None),
    "default+auth-off": ([], {"auth": {"enabled": False}}),
    "default+internal-tls-off": ([], {"internalTLS": {"enabled": False}}),
    "gpu+optional-keda": ([VALUES_GPU], ALL_OPTIONAL),
    "cpu+optional-hpa": ([VALUES_CPU], {**ALL_OPTIONAL, "autoscaling": {"enabled": True, "kind": "hpa"}}),
}


@pytest.mark.parametrize("name", list(VALIDATION_SETS))
def test_helm_lint_strict(name):
    files, values = VALIDATION_SETS[name]
    with tempfile.TemporaryDirectory() as tmp:
        r = run_helm("lint", "--strict", str(CHART), *values_args(files, values, tmp))
    assert r.returncode == 0, f"helm lint --strict ({name} values) failed:\n{r.stdout}\n{r.stderr}"
    assert "0 chart(s) failed" in r.stdout, r.stdout


# ---------------------------------------------------------------- schemas


def kube_versions() -> list[str]:
    import kubernetes_validate.utils as kv

    minors = sorted({tuple(int(p) for p in v.split(".")[:2]) for v in kv.all_versions()})
    chosen = [f"{a}.{b}" for a, b in minors if (a, b) >= MIN_KUBE]
    assert chosen, f"kubernetes-validate ships no schemas for >= {MIN_KUBE}: {minors}"
    return chosen




@pytest.mark.parametrize("name", list(VALIDATION_SETS))
def test_rendered_documents_validate_against_kubernetes_schemas(name, capsys):
    import kubernetes_validate.utils as kv

    files, values = VALIDATION_SETS[name]
    versions = kube_versions()
    validated, no_schema, errors = 0, {}, []
    for version in versions:
        # --kube-version also exercises the chart's kubeVersion constraint.
        docs = render(files, values, extra=("--kube-version", f"v{version}.0"))
        assert docs, "nothing rendered"
        for doc in docs:
            what = f'{doc["kind"]}/{doc["metadata"]["name"]} ({doc["apiVersion"]})'
            try:
                used = kv.validate(doc, version, strict=True)
                assert used == version, f"validated {what} against {used}, asked for {version}"
                validated += 1
            except kv.SchemaNotFoundError:
                no_schema.setdefault(what, []).append(version)
            except kv.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                errors.append(f"k8s {version}: {what}: at {path}: {e.message}")
    with capsys.disabled():
        print(f"\n[{name}] validated {validated} documents (strict) against Kubernetes {', '.join(versions)}")
        for what, vs in sorted(no_schema.items()):
            print(f"[{name}] NOT VALIDATED (no schema: a CRD kind): {what}, {len(vs)} version(s)")
    assert not errors, "schema errors:\n" + "\n".join(errors)
    # Only CRD kinds may lack a schema; a core kind without one is a typo.
    core = [w for w in no_schema if not any(g in w for g in ("keda.sh/", "monitoring.coreos.com/"))]
    assert not core, f"kinds without a schema that are not CRDs: {core}"
    if values is ALL_OPTIONAL:
        assert len(no_schema) >= 3, f"expected ScaledObject, ServiceMonitor and PodMonitor to be counted: {no_schema}"


def test_kube_version_below_claimed_is_refused():
    r = run_helm("template", RELEASE, str(CHART), "--kube-version", "v1.27.0")
    assert r.returncode != 0
    assert ">=1.28.0-0" in r.stderr, r.stderr


# ---------------------------------------------------------------- coordinators


def internal_urls(n, release=RELEASE, ns=NAMESPACE, domain="cluster.local", port=50052):
    """Each coordinator pod's internal-plane URL: its name through the
    headless peers Service, on the internal port."""
    full = release if "llmos" in release else f"{release}-llmos"
    return [f"http://{full}-coordinator-{i}.{full}-coordinator-peers.{ns}.svc.{domain}:{port}" for i in range(n)]


def expected_peers(n, release=RELEASE, ns=NAMESPACE, domain="cluster.local", port=50052):
    return [f"{i + 1}={url}" for i, url in enumerate(internal_urls(n, release, ns, domain, port))]


@pytest.mark.parametrize("n", [1, 3, 5])
def test_coordinator_peers_list(n):
    docs = render(values={"coordinator": {"replicas": n}})
    sts = one(docs, "StatefulSet", coord_name())
    assert sts["spec"]["replicas"] == n
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == "llmos-coordinator-peers"
    c = container(sts)
    assert c["command"] == ["/usr/local/bin/llmos-coordinator"]
    args = c["args"]
    peers = expected_peers(n)
    assert flag(args, "peers") == ",".join(peers)
    assert flag(args, "node-id") == "0"
    # Public plane on 50051, internal plane (Registry, Raft) on 50052.
    assert flag(args, "listen") == "$(POD_IP):50051"
    assert flag(args, "internal-listen") == "$(POD_IP):50052"
    assert flag(args, "data-dir") == "/var/lib/llmos"
    assert flag(args, "cluster-id") == "llmos"
    # Each pod's --advertise (with its name put in for $(POD_NAME)) is its
    # own entry of --peers, the one numbered ordinal + 1.
    advertise = flag(args, "advertise")
    for i in range(n):
        pod = f"llmos-coordinator-{i}"
        assert f"{i + 1}={advertise.replace('$(POD_NAME)', pod)}" == peers[i]


def test_coordinator_peers_follow_release_namespace_and_domain():
    docs = render(values={"clusterDomain": "corp.internal"}, release="prod", namespace="serving")
    sts = one(docs, "StatefulSet", "prod-llmos-coordinator")
    args = container(sts)["args"]
    assert flag(args, "peers") == ",".join(expected_peers(3, "prod", "serving", "corp.internal"))
    assert flag(args, "advertise") == (
        "http://$(POD_NAME).prod-llmos-coordinator-peers.serving.svc.corp.internal:50052"
    )
    one(docs, "Service", "prod-llmos-coordinator-peers")
    worker = pools(docs)["cpu"]
    assert flag(container(worker)["args"], "coordinator") == ",".join(
        internal_urls(3, "prod", "serving", "corp.internal")
    )
    # The CLI pods keep the client Service's public port.
    for w in cli_workloads(docs, "prod-llmos"):
        assert "--coordinator=http://prod-llmos-coordinator.serving.svc.corp.internal:50051" in container(w)["command"]


def test_coordinator_env_has_downward_api_and_pod_name():
    sts = one(render(), "StatefulSet", coord_name())
    env = env_of(container(sts))
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["LLMOS_POD_NAME"]["value"] == "$(POD_NAME)"
    names = [e["name"] for e in container(sts)["env"]]
    # $(POD_NAME) is only expanded when POD_NAME is defined earlier.
    assert names.index("POD_NAME") < names.index("LLMOS_POD_NAME")
    # The embedded model's path comes from the image: never overridden.
    assert "LLMOS_SMOLLM2_GGUF" not in env


def test_coordinator_services_probes_and_storage():
    docs = render()
    peers = one(docs, "Service", "llmos-coordinator-peers")
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is True
    # The headless Service carries the internal plane only; the client
    # Service the public ports only.
    assert peers["spec"]["ports"] == [{"name": "internal", "port": 50052, "targetPort": "internal", "protocol": "TCP"}]
    client = one(docs, "Service", coord_name())
    assert client["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in client["spec"]["ports"]] == [("http", 8000), ("grpc", 50051)]
    sts = one(docs, "StatefulSet", coord_name())
    for svc in (peers, client):
        assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    c = container(sts)
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("grpc", 50051), ("http", 8000), ("internal", 50052)]
    # Health is served on both gRPC ports; the probes keep the public one.
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": 50051}, probe
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert {"name": "data", "mountPath": "/var/lib/llmos"} in c["volumeMounts"]
    assert not any(v["name"] == "data" for v in pod_spec(sts)["volumes"])

    docs = render(values={"coordinator": {"persistence": {"enabled": False}, "service": {"type": "NodePort", "nodePort": 30051, "annotations": {"a": "b"}}}})
    sts = one(docs, "StatefulSet", coord_name())
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(sts)["volumes"]
    client = one(docs, "Service", coord_name())
    assert client["spec"]["type"] == "NodePort"
    grpc_port = next(p for p in client["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["nodePort"] == 30051
    assert client["metadata"]["annotations"] == {"a": "b"}


def test_coordinator_optional_flags_only_when_set():
    args = container(one(render(), "StatefulSet", coord_name()))["args"]
    optional = ["worker-grace-period-s", "heartbeat-timeout-s", "drain-timeout-s",
                "migration-limit", "migration-timeout-s", "routing"]
    for name in optional:
        assert flag(args, name) is None, f"--{name} rendered without being set"
    values = {"coordinator": {
        "workerGracePeriodSeconds": 45, "heartbeatTimeoutSeconds": 12, "drainTimeoutSeconds": 200,
        "migrationLimit": 0, "migrationTimeoutSeconds": 90, "routing": "round-robin",
        "clusterId": "prod", "extraArgs": ["--raft-tick-ms=50"],
    }}
    args = container(one(render(values=values), "StatefulSet", coord_name()))["args"]
    assert [flag(args, n) for n in optional] == ["45", "12", "200", "0", "90", "round-robin"]
    assert flag(args, "cluster-id") == "prod"
    assert args[-1] == "--raft-tick-ms=50"
    assert "/coordinator/routing" in render_error(values={"coordinator": {"routing": "random"}})


@pytest.mark.parametrize("n,quorum", [(1, 1), (3, 2), (5, 3), (7, 4)])
def test_pdb_keeps_quorum(n, quorum):
    docs = render(values={"coordinator": {"replicas": n}})
    pdb = one(docs, "PodDisruptionBudget", coord_name())
    assert pdb["spec"]["minAvailable"] == quorum
    sts = one(docs, "StatefulSet", coord_name())
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


# ---------------------------------------------------------------- workers


def test_gpu_resources_only_in_cuda_pools():
    docs = render([VALUES_GPU])
    by_pool = pools(docs)
    assert set(by_pool) == {"gpu", "cpu"}
    devices = {}
    for name, sts in by_pool.items():
        c = container(sts)
        device = flag(c["args"], "device")
        devices[name] = device
        res = c.get("resources", {})
        gpu_keys = [k for part in ("requests", "limits") for k in res.get(part, {}) if "gpu" in k]
        if device == "cuda":
            assert res["limits"]["nvidia.com/gpu"] == 1, name
            tolerations = pod_spec(sts)["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
            assert pod_spec(sts)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert "NVIDIA_VISIBLE_DEVICES" not in env_of(c)
        else:
            assert gpu_keys == [], f"cpu pool {name} got GPU resources: {res}"
            assert "tolerations" not in pod_spec(sts)
    assert devices == {"gpu": "cuda", "cpu": "cpu"}
    # Nothing but the cuda pool asks for a GPU.
    for d in docs:
        if d["kind"] in ("StatefulSet", "Job", "Pod") and d.get("metadata", {}).get("labels", {}).get("llmos.io/pool") != "gpu":
            assert "nvidia.com/gpu" not in json.dumps(d), f'{d["kind"]}/{d["metadata"]["name"]}'
    for name, values_file in (("default", None), ("cpu", VALUES_CPU)):
        text = render_text([values_file] if values_file else [])
        assert "nvidia.com/gpu" not in text, f"{name} values render a GPU resource"


def test_cpu_pool_with_gpu_resources_is_refused():
    err = render_error(values={"workerPools": [{
        "name": "small", "replicas": 1, "device": "cpu",
        "resources": {"limits": {"nvidia.com/gpu": 1}},
    }]})
    assert "workerPools[0] (small)" in err and "nvidia.com/gpu" in err and "cuda" in err, err


def test_worker_pool_flags_labels_and_pod_labels():
    values = {"workerPools": [
        {"name": "big", "replicas": 3, "device": "cuda", "threads": 8,
         "labels": {"zone": "a", "accelerator": "h100", "tier": "1"},
         "extraArgs": ["--extra=1"], "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
         "resources": {"limits": {"nvidia.com/gpu": 1}}},
        {"name": "small", "replicas": 1, "device": "cpu"},
    ], "models": [{"name": "m", "source": "smollm2", "pool": "small"}]}
    docs = render(values=values)
    by_pool = pools(docs)
    assert set(by_pool) == {"big", "small"}
    big = by_pool["big"]
    assert big["metadata"]["name"] == "llmos-worker-big"
    assert big["spec"]["replicas"] == 3
    assert big["spec"]["serviceName"] == "llmos-worker-big"
    c = container(big)
    assert c["command"] == ["/usr/local/bin/llmos-worker"]
    assert c["args"] == [
        "serve",
        "--listen=$(POD_IP):50061",
        "--collective-port=50062",
        "--metrics-listen=$(POD_IP):9091",
        "--advertise=http://$(POD_IP):50061",
        "--worker-id=$(POD_NAME)",
        # Every coordinator's internal plane, through the headless Service.
        "--coordinator=" + ",".join(internal_urls(3)),
        "--device=cuda",
        "--pool=big",
        "--threads=8",
        "--drain-timeout-s=300",
        # sorted by key
        "--label=accelerator=h100",
        "--label=tier=1",
        "--label=zone=a",
        # The internal plane on mutual TLS (internalTLS, on by default).
        "--tls-cert=/etc/llmos/tls/worker.crt",
        "--tls-key=/etc/llmos/tls/worker.key",
        "--tls-ca=/etc/llmos/tls/ca.crt",
        "--extra=1",
    ]
    env = env_of(c)
    for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"), ("POD_IP", "status.podIP")):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    # Caches (the CUDA kernels' PTX) must land on a writable mount.
    assert env["XDG_CACHE_HOME"]["value"].startswith("/tmp/")
    assert "LLMOS_SMOLLM2_GGUF" not in env
    assert env["RUST_LOG"]["value"] == "debug"
    labels = big["spec"]["template"]["metadata"]["labels"]
    assert labels["llmos.io/pool"] == "big"
    assert labels["app.kubernetes.io/component"] == "worker"
    assert big["spec"]["selector"]["matchLabels"]["llmos.io/pool"] == "big"
    # The gRPC port is on mutual TLS, which the kubelet's gRPC probe cannot
    # speak: the probes connect to the plaintext metrics port (see
    # test_worker_probes_follow_internal_tls).
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["tcpSocket"] == {"port": 9091}, probe
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50061, "collective": 50062, "metrics": 9091}

    small = container(by_pool["small"])
    assert flag(small["args"], "threads") is None
    assert flag(small["args"], "device") == "cpu"
    assert flag(small["args"], "pool") == "small"
    assert not [a for a in small["args"] if a.startswith("--label=")]

    svc = one(docs, "Service", "llmos-worker-big")
    assert svc["spec"]["clusterIP"] == "None"
    # The metrics port is scraped per pod (PodMonitor), not through the Service.
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50061, "collective": 50062}
    assert svc["spec"]["selector"].items() <= labels.items()
    # The two pools' selectors do not overlap.
    assert not (by_pool["small"]["spec"]["selector"]["matchLabels"].items()
                <= big["spec"]["template"]["metadata"]["labels"].items())


def test_cpu_values_pool():
    docs = render([VALUES_CPU])
    assert one(docs, "StatefulSet", coord_name())["spec"]["replicas"] == 3
    by_pool = pools(docs)
    assert list(by_pool) == ["cpu"]
    sts = by_pool["cpu"]
    assert sts["spec"]["replicas"] == 2
    args = container(sts)["args"]
    assert flag(args, "threads") == "1"
    assert flag(args, "device") == "cpu"


def test_worker_metrics_listen_on_the_metrics_port():
    for port, values in ((9091, None), (9400, {"worker": {"metricsPort": 9400}})):
        docs = render([VALUES_GPU], values)
        for name, sts in pools(docs).items():
            c = container(sts)
            # Always on: --metrics-listen on the pod IP, the named port `metrics`.
            assert flag(c["args"], "metrics-listen") == f"$(POD_IP):{port}", name
            metrics = [p for p in c["ports"] if p["name"] == "metrics"]
            assert metrics == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}], name
            # $(POD_IP) is expanded from the env.
            assert "POD_IP" in env_of(c), name
    assert "/worker/metricsPort" in render_error(values={"worker": {"metricsPort": 70000}})
    err = render_error(values={"worker": {"metricsPort": 50062}})
    assert "worker.metricsPort (50062)" in err, err


@pytest.mark.parametrize("pool_drain,default_drain,expected", [
    (None, None, 300),
    (600, None, 600),
    (0, None, 0),
    (None, 120, 120),
])
def test_termination_grace_period_covers_drain(pool_drain, default_drain, expected):
    pool = {"name": "p", "replicas": 1, "device": "cpu"}
    if pool_drain is not None:
        pool["drainTimeoutSeconds"] = pool_drain
    values = {"workerPools": [pool], "models": []}
    if default_drain is not None:
        values["worker"] = {"drainTimeoutSeconds": default_drain}
    sts = pools(render(values=values))["p"]
    assert flag(container(sts)["args"], "drain-timeout-s") == str(expected)
    assert pod_spec(sts)["terminationGracePeriodSeconds"] == expected + 30
    assert "lifecycle" not in container(sts), "preStop hook is off by default"


def test_prestop_hook_is_optional():
    sts = pools(render(values={"worker": {"preStop": {"enabled": True, "sleepSeconds": 7}}}))["cpu"]
    assert container(sts)["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", "-c", "sleep 7"]


def test_model_storage_mounts_on_workers_only():
    for storage, volume in (
        ({"type": "pvc", "pvc": {"claimName": "models"}}, {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}),
        ({"type": "hostPath", "hostPath": {"path": "/srv/models"}}, {"hostPath": {"path": "/srv/models", "type": "Directory"}}),
    ):
        docs = render(values={"modelStorage": storage})
        worker = pools(docs)["cpu"]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in container(worker)["volumeMounts"]
        assert {"name": "models", **volume} in pod_spec(worker)["volumes"]
        coordinator = one(docs, "StatefulSet", coord_name())
        assert not any(m["mountPath"] == "/models" for m in container(coordinator)["volumeMounts"])
    worker = pools(render())["cpu"]
    assert not any(m["mountPath"] == "/models" for m in container(worker)["volumeMounts"])
    err = render_error(values={"modelStorage": {"type": "pvc"}})
    assert "modelStorage" in err and "pvc" in err, err
    err = render_error(values={"modelStorage": {"type": "nfs"}})
    assert "/modelStorage/type" in err, err


# ---------------------------------------------------------------- models


FULL_MODEL = {
    "name": "llama", "source": "/models/llama", "dtype": "bf16", "quantize": "int8",
    "replicas": 2, "stages": 2, "split": [12, 20], "tp": 2, "pool": "cpu",
    "labels": {"zone": "a"}, "kvBlocks": 2048, "blockSize": 16, "maxBatchTokens": 1024,
    "maxRunning": 32, "maxWaiting": 128, "prefixCaching": False, "pipelineTransport": "link",
    "autoscale": {"min": 1, "max": 4},
}


@pytest.mark.parametrize("case", ["cpu", "full"])
def test_models_configmap_is_the_values_list(case):
    if case == "cpu":
        files, values = [VALUES_CPU], None
        expected = yaml.safe_load(VALUES_CPU.read_text())["models"]
        assert expected == [{"name": "smollm2", "source": "smollm2", "dtype": "f32", "replicas": 1, "stages": 2, "pool": "cpu"}]
    else:
        expected = [FULL_MODEL, {"name": "tiny", "source": "smollm2"}]
        files, values = [], {"models": expected}
    docs = render(files, values)
    cm = one(docs, "ConfigMap", "llmos-models")
    assert json.loads(cm["data"]["models.json"]) == {"models": expected}


def test_models_job_applies_the_list():
    docs = render([VALUES_CPU])
    job = one(docs, "Job", "llmos-models")
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "post-install,post-upgrade"
    assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation"
    spec = job["spec"]
    assert spec["backoffLimit"] == 6
    assert spec["activeDeadlineSeconds"] == 1800
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    assert c["command"] == [
        "/usr/local/bin/llmos",
        f"--coordinator=http://llmos-coordinator.{NAMESPACE}.svc.cluster.local:50051",
        "apply",
        "/etc/llmos/models.json",
        "--timeout=600",
    ]
    assert "args" not in c
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/llmos")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "llmos-models"
    # An upgrade changing a model's replicas changes the Job's checksum.
    changed = yaml.safe_load(VALUES_CPU.read_text())["models"]
    changed[0]["replicas"] = 2
    job2 = one(render([VALUES_CPU], {"models": changed}), "Job", "llmos-models")
    key = "llmos.io/models-checksum"
    assert len(ann[key]) == 64
    assert job2["metadata"]["annotations"][key] != ann[key]
    assert job2["spec"]["template"]["metadata"]["annotations"][key] == job2["metadata"]["annotations"][key]


def test_no_models_renders_no_job():
    docs = render(values={"models": []})
    assert not kinds(docs, "Job") and not [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"] == "llmos-models"]
    assert not kinds(docs, "Pod"), "the helm test pod needs a model"


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize("values,must_mention", [
    ({"workerPools": [{"name": "cpu", "replicas": -1, "device": "cpu"}]}, ["/workerPools/0/replicas", "minimum"]),
    ({"workerPools": [{"name": "cpu", "replicas": 1, "device": "tpu"}]}, ["/workerPools/0/device", "cpu", "cuda"]),
    ({"coordinator": {"replicas": 2}}, ["/coordinator/replicas", "1, 3, 5"]),
    ({"coordinator": {"replicas": 4}}, ["/coordinator/replicas"]),
    ({"coordinator": {"replicas": -3}}, ["/coordinator/replicas"]),
    ({"models": [{"name": "m"}]}, ["/models/0", "source"]),
    ({"models": [{"source": "smollm2"}]}, ["/models/0", "name"]),
    ({"models": [{"name": "m", "source": "smollm2", "replicas": -1}]}, ["/models/0/replicas"]),
    ({"models": [{"name": "m", "source": "smollm2", "dtype": "f8"}]}, ["/models/0/dtype", "bf16"]),
    ({"models": [{"name": "m", "source": "smollm2", "quantise": "int8"}]}, ["/models/0", "quantise"]),
    ({"models": [{"name": "m", "source": "smollm2", "pipelineTransport": "nccl"}]}, ["/models/0/pipelineTransport"]),
    ({"workerPools": [{"name": "Bad_Name", "replicas": 1}]}, ["/workerPools/0/name"]),
    ({"coordinatr": {"replicas": 3}}, ["coordinatr"]),
    ({"auth": {"enabled": "yes"}}, ["/auth/enabled", "boolean"]),
    ({"auth": {"existingSecret": "Team_Keys"}}, ["/auth/existingSecret"]),
    ({"auth": {"secretKey": ""}}, ["/auth/secretKey"]),
    ({"auth": {"enable": False}}, ["/auth", "enable"]),
    ({"internalTLS": {"enabled": "yes"}}, ["/internalTLS/enabled", "boolean"]),
    ({"internalTLS": {"secretName": "My_TLS"}}, ["/internalTLS/secretName"]),
    ({"internalTLS": {"validityDays": 0}}, ["/internalTLS/validityDays", "minimum"]),
    ({"internalTLS": {"caSecret": "x"}}, ["/internalTLS", "caSecret"]),
])
def test_schema_rejects_bad_values(values, must_mention):
    err = render_error(values=values)
    assert "schema" in err, err
    for text in must_mention:
        assert text in err, f"error does not mention {text!r}:\n{err}"


@pytest.mark.parametrize("values,must_mention", [
    ({"workerPools": [{"name": "a", "replicas": 1}, {"name": "a", "replicas": 1}], "models": []}, ['"a" is used twice']),
    ({"models": [{"name": "m", "source": "smollm2"}, {"name": "m", "source": "smollm2"}]}, ['"m" is listed twice']),
    ({"models": [{"name": "m", "source": "smollm2", "pool": "gpu"}]}, ['pool "gpu" is not one of workerPools (cpu)']),
    ({"models": [{"name": "m", "source": "smollm2", "autoscale": {"min": 3, "max": 2}}]}, ["autoscale.min (3) is above autoscale.max (2)"]),
    ({"models": [{"name": "m", "source": "smollm2", "stages": 3, "split": [10, 20]}]}, ["split has 2 stages but stages is 3"]),
    ({"fullnameOverride": "x" * 60}, ["longer than 63 characters", "fullnameOverride"]),
    ({"auth": {"enabled": False, "metricsNeedKey": True}}, ["auth.metricsNeedKey needs auth.enabled"]),
    ({"internalTLS": {"coordinatorSecret": "c"}}, ["internalTLS.coordinatorSecret and internalTLS.workerSecret go together"]),
    ({"internalTLS": {"workerSecret": "w"}}, ["internalTLS.coordinatorSecret and internalTLS.workerSecret go together"]),
    ({"internalTLS": {"secretName": "s", "coordinatorSecret": "c", "workerSecret": "w"}}, ["exclude each other"]),
])
def test_chart_checks_reject_inconsistent_values(values, must_mention):
    err = render_error(values=values)
    for text in must_mention:
        assert text in err, f"error does not mention {text!r}:\n{err}"


def test_example_values_files_pass_the_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    for f in (VALUES_CPU, VALUES_GPU):
        jsonschema.Draft7Validator(schema).validate({**defaults, **yaml.safe_load(f.read_text())})


# ---------------------------------------------------------------- helm test


def test_helm_test_pod_generates():
    docs = render([VALUES_CPU])
    pod = next(d for d in kinds(docs, "Pod"))
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["containers"][0]["command"] == [
        "/usr/local/bin/llmos",
        f"--coordinator=http://llmos-coordinator.{NAMESPACE}.svc.cluster.local:50051",
        "generate",
        "--model=smollm2",
        "--prompt=Say hello.",
        "--max-tokens=8",
    ]
    values = {"models": [{"name": "a", "source": "smollm2"}, {"name": "b", "source": "smollm2"}],
              "tests": {"prompt": "2+2=?", "model": "b"}}
    command = next(d for d in kinds(render(values=values), "Pod"))["spec"]["containers"][0]["command"]
    assert "--model=b" in command and "--prompt=2+2=?" in command
    values["tests"] = {}
    command = next(d for d in kinds(render(values=values), "Pod"))["spec"]["containers"][0]["command"]
    assert "--model=a" in command and "--prompt=Say hello." in command
    assert not kinds(render(values={"tests": {"enabled": False}}), "Pod")
    # --skip-tests drops it: it is a test hook, not a release resource.
    assert not kinds(render(extra=("--skip-tests",)), "Pod")


# ---------------------------------------------------------------- API keys


def admin_key_file(sts) -> tuple[str, dict, dict]:
    """The coordinators' --admin-key-file, followed to what it reads:
    (path, its volumeMount, the Secret volume's `secret` source)."""
    c = container(sts)
    path = flag(c["args"], "admin-key-file")
    assert path, f"no --admin-key-file: {c['args']}"
    mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{path} is under {len(mounts)} mounts: {c['volumeMounts']}"
    volume = next(v for v in pod_spec(sts)["volumes"] if v["name"] == mounts[0]["name"])
    assert "secret" in volume, volume
    return path, mounts[0], volume["secret"]


def cli_workloads(docs, fullname="llmos") -> list[dict]:
    """What runs the llmos CLI against the coordinators: the models Job and the `helm test` pod."""
    out = [one(docs, "Job", f"{fullname}-models"), one(docs, "Pod", f"{fullname}-test-generate")]
    for w in out:
        assert container(w)["command"][0] == "/usr/local/bin/llmos"
    return out


def uses_secret(workload, name) -> bool:
    spec = pod_spec(workload)
    volumes = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == name]
    refs = [e for c in spec["containers"] for e in c.get("env", [])
            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == name]
    return bool(volumes or refs)


def test_default_render_makes_a_random_admin_key():
    secret = one(render(), "Secret", "llmos-auth")
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert list(secret["data"]) == ["admin-key"]
    key = base64.b64decode(secret["data"]["admin-key"]).decode()
    # What the coordinator accepts as a bootstrap key: 20+ characters.
    assert len(key) >= 20 and key.isalnum(), key
    # Random, not a default baked into the chart: another render (no
    # cluster, so nothing to look up) makes another key.
    again = base64.b64decode(one(render(), "Secret", "llmos-auth")["data"]["admin-key"]).decode()
    assert again != key
    # An upgrade keeps the installed key: helm cannot look a Secret up
    # without a cluster, so this checks that the template asks for its own.
    template = (CHART / "templates" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template
    assert '$name := include "llmos.auth.secretName" .' in template


def test_coordinators_read_the_admin_key_from_the_secret():
    docs = render()
    sts = one(docs, "StatefulSet", coord_name())
    args = container(sts)["args"]
    assert "--no-auth" not in args and "--metrics-need-key" not in args
    path, mount, source = admin_key_file(sts)
    assert mount["readOnly"] is True
    assert source["secretName"] == "llmos-auth"
    # The file --admin-key-file names is the Secret's admin key.
    assert source["items"] == [{"key": "admin-key", "path": os.path.relpath(path, mount["mountPath"])}]
    assert source["defaultMode"] == 0o440
    # Only the coordinators' volume exposes it: nothing else mounts it.
    others = [w for w in docs if w["kind"] in ("StatefulSet", "Job", "Pod") and w is not sts]
    assert not [w for w in others
                if any(v.get("secret", {}).get("secretName") == "llmos-auth" for v in pod_spec(w).get("volumes", []))]


def test_cli_pods_send_the_admin_key():
    docs = render()
    for w in cli_workloads(docs):
        env = env_of(container(w))
        assert env["LLMOS_API_KEY"] == {
            "name": "LLMOS_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "llmos-auth", "key": "admin-key"}},
        }, w["metadata"]["name"]
    # The admin key goes only where it is used: coordinators, the models
    # Job and the test pod; workers talk to the coordinators' internal plane.
    users = sorted(w["metadata"]["name"] for w in docs
                   if w["kind"] in ("StatefulSet", "Job", "Pod") and uses_secret(w, "llmos-auth"))
    assert users == ["llmos-coordinator", "llmos-models", "llmos-test-generate"]


def test_existing_secret_is_used_everywhere():
    docs = render(values={"auth": {"existingSecret": "team-keys", "secretKey": "token"}})
    assert [s["metadata"]["name"] for s in kinds(docs, "Secret")] == ["llmos-internal-tls"], \
        "an auth Secret rendered beside auth.existingSecret"
    _, _, source = admin_key_file(one(docs, "StatefulSet", coord_name()))
    assert source["secretName"] == "team-keys"
    assert [it["key"] for it in source["items"]] == ["token"]
    for w in cli_workloads(docs):
        ref = env_of(container(w))["LLMOS_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "team-keys", "key": "token"}, w["metadata"]["name"]
    users = [w for w in docs if w["kind"] in ("StatefulSet", "Job", "Pod") and uses_secret(w, "team-keys")]
    assert len(users) == 3


def test_auth_off_renders_no_auth_and_no_secret():
    docs = render(values={"auth": {"enabled": False}})
    # Only the internal plane's certificates (internalTLS) are left.
    assert [s["metadata"]["name"] for s in kinds(docs, "Secret")] == ["llmos-internal-tls"]
    sts = one(docs, "StatefulSet", coord_name())
    args = container(sts)["args"]
    assert "--no-auth" in args
    assert flag(args, "admin-key-file") is None
    assert [v["secret"]["secretName"] for v in pod_spec(sts)["volumes"] if "secret" in v] == ["llmos-internal-tls"]
    assert not kinds(render(values={"auth": {"enabled": False}, "internalTLS": {"enabled": False}}), "Secret")
    for w in cli_workloads(docs):
        assert "LLMOS_API_KEY" not in env_of(container(w)), w["metadata"]["name"]
    # Keys on: no --no-auth.
    assert "--no-auth" not in container(one(render(), "StatefulSet", coord_name()))["args"]


def test_metrics_need_key_and_the_service_monitor_sends_it():
    values = {"auth": {"metricsNeedKey": True}, "metrics": {"serviceMonitor": {"enabled": True}}}
    docs = render(values=values)
    assert "--metrics-need-key" in container(one(docs, "StatefulSet", coord_name()))["args"]
    [endpoint] = one(docs, "ServiceMonitor", "llmos")["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "llmos-auth", "key": "admin-key"}}
    # The workers' PodMonitor needs none: their /metrics takes no key.
    [pm] = one(docs, "PodMonitor", "llmos-worker")["spec"]["podMetricsEndpoints"]
    assert "authorization" not in pm
    values["auth"]["existingSecret"] = "team-keys"
    [endpoint] = one(render(values=values), "ServiceMonitor", "llmos")["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "team-keys", "key": "admin-key"}
    # Off by default: /metrics open, nothing sent.
    [endpoint] = one(render(values={"metrics": {"serviceMonitor": {"enabled": True}}}), "ServiceMonitor", "llmos")["spec"]["endpoints"]
    assert "authorization" not in endpoint


# ---------------------------------------------------------------- internal TLS


TLS_KEYS = ["ca.crt", "coordinator.crt", "coordinator.key", "worker.crt", "worker.key"]
TLS_FLAGS = ("tls-cert", "tls-key", "tls-ca")


def tls_secret_data(docs, name="llmos-internal-tls") -> dict[str, bytes]:
    secret = one(docs, "Secret", name)
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def internal_tls_workloads(docs) -> dict[str, tuple[dict, str]]:
    """What runs llmos-coordinator or llmos-worker, by name, with its role."""
    out = {coord_name(): (one(docs, "StatefulSet", coord_name()), "coordinator")}
    for sts in pools(docs).values():
        out[sts["metadata"]["name"]] = (sts, "worker")
    return out


def tls_files(workload) -> dict[str, tuple[str, str, dict]]:
    """The --tls-cert, --tls-key and --tls-ca a workload's process reads,
    followed to what holds them: flag -> (path, the Secret's name, its key)."""
    c = container(workload)
    out = {}
    for name in TLS_FLAGS:
        path = flag(c["args"], name)
        assert path, f"no --{name}: {c['args']}"
        mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, f"{path} is under {len(mounts)} mounts: {c['volumeMounts']}"
        mount = mounts[0]
        # Read-only, and the whole volume: a subPath mount would never see
        # the kubelet's updates of the Secret (rotation).
        assert mount["readOnly"] is True and "subPath" not in mount, mount
        volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
        source = volume["secret"]
        file = os.path.relpath(path, mount["mountPath"])
        [item] = [it for it in source["items"] if it["path"] == file]
        out[name] = (path, source["secretName"], item["key"])
    return out


def test_default_render_generates_the_internal_tls_secret():
    docs = render()
    secret = one(docs, "Secret", "llmos-internal-tls")
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert sorted(secret["data"]) == sorted(TLS_KEYS)
    data = tls_secret_data(docs)
    ca = x509(data["ca.crt"])
    assert ca["ca"] is True and ca["subject"] == "CN = llmos internal CA", ca
    for role in ("coordinator", "worker"):
        cert, key = data[f"{role}.crt"], data[f"{role}.key"]
        info = x509(cert)
        # The role's DNS name and nothing else: one shared certificate per
        # role (no llmos:// id, no pod address; servers are checked against
        # the role's name, not the address dialled).
        assert info["san"] == [f"DNS:{role}.llmos"], (role, info)
        assert info["ca"] is False, role
        # Every process both serves and dials.
        assert {"TLS Web Server Authentication", "TLS Web Client Authentication"} <= set(info["eku"]), (role, info)
        assert chains_to(cert, data["ca.crt"]), f"{role}.crt does not chain to ca.crt"
        assert key_matches(cert, key), f"{role}.key is not the key of {role}.crt"
        assert key.startswith(b"-----BEGIN RSA PRIVATE KEY-----"), key[:40]
        assert info["notAfter"] - info["notBefore"] == ca["notAfter"] - ca["notBefore"]
        assert round((info["notAfter"] - info["notBefore"]).total_seconds() / 86400) == 365, info
    # Two CAs of two renders trust each other's certificates? No: each
    # render (no cluster, nothing to look up) makes its own.
    other = tls_secret_data(render())
    assert other["ca.crt"] != data["ca.crt"]
    assert not chains_to(other["worker.crt"], data["ca.crt"])
    # An upgrade keeps the installed certificates: helm cannot look a
    # Secret up without a cluster, so this checks the template asks for it.
    template = (CHART / "templates" / "internal-tls.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template
    assert '$name := include "llmos.tls.generatedSecretName" .' in template


def test_internal_tls_validity_days():
    data = tls_secret_data(render(values={"internalTLS": {"validityDays": 30}}))
    for key in ("ca.crt", "coordinator.crt", "worker.crt"):
        info = x509(data[key])
        assert round((info["notAfter"] - info["notBefore"]).total_seconds() / 86400) == 30, (key, info)


@pytest.mark.parametrize("files", [[], [VALUES_GPU]], ids=["default", "gpu"])
def test_coordinators_and_workers_read_their_certificates(files):
    docs = render(files)
    data = tls_secret_data(docs)
    workloads = internal_tls_workloads(docs)
    assert len(workloads) == (3 if files else 2), list(workloads)
    for name, (workload, role) in workloads.items():
        args = container(workload)["args"]
        assert "--insecure" not in args, name
        found = tls_files(workload)
        assert {f: (p, s) for f, (p, s, _) in found.items()} == {
            "tls-cert": (f"/etc/llmos/tls/{role}.crt", "llmos-internal-tls"),
            "tls-key": (f"/etc/llmos/tls/{role}.key", "llmos-internal-tls"),
            "tls-ca": ("/etc/llmos/tls/ca.crt", "llmos-internal-tls"),
        }, name
        assert [found[f][2] for f in TLS_FLAGS] == [f"{role}.crt", f"{role}.key", "ca.crt"], name
        # What the process will read: its role's certificate, with its key,
        # from the CA every other process trusts.
        cert, key, ca = (data[found[f][2]] for f in TLS_FLAGS)
        assert x509(cert)["san"] == [f"DNS:{role}.llmos"], name
        assert key_matches(cert, key) and chains_to(cert, ca), name
        # Only its own role's key reaches a pod.
        volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == "internal-tls")
        assert sorted(it["key"] for it in volume["secret"]["items"]) == sorted(["ca.crt", f"{role}.crt", f"{role}.key"]), name
        assert volume["secret"]["defaultMode"] == 0o440, name
        # The processes read the files again when they change: no checksum
        # annotation restarts the pods when the Secret does.
        annotations = workload["spec"]["template"]["metadata"].get("annotations") or {}
        assert not [k for k in annotations if "checksum" in k], (name, annotations)
    # Nothing else mounts the certificates: the models Job and the test pod
    # use the public API only.
    users = sorted(w["metadata"]["name"] for w in docs
                   if w["kind"] in ("StatefulSet", "Job", "Pod") and uses_secret(w, "llmos-internal-tls"))
    assert users == sorted(workloads)
    for w in cli_workloads(docs):
        assert not [a for a in container(w)["command"] if a.startswith(("--tls-", "--insecure"))], w["metadata"]["name"]


def test_worker_probes_follow_internal_tls():
    # Mutual TLS on the gRPC port: the kubelet's gRPC probe cannot speak it,
    # so a TCP connection to the plaintext metrics port stands in.
    for port, values in ((9091, None), (9400, {"worker": {"metricsPort": 9400}})):
        c = container(pools(render(values=values))["cpu"])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["tcpSocket"] == {"port": port} and "grpc" not in c[probe], (probe, c[probe])
    # Plaintext: gRPC health on the gRPC port, as before.
    c = container(pools(render(values={"internalTLS": {"enabled": False}}))["cpu"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": 50061} and "tcpSocket" not in c[probe], (probe, c[probe])
    # The coordinators keep gRPC health on their public port (no TLS there).
    for values in (None, {"internalTLS": {"enabled": False}}):
        c = container(one(render(values=values), "StatefulSet", coord_name()))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"] == {"port": 50051}, probe


def test_internal_tls_off_is_insecure():
    docs = render([VALUES_GPU], {"internalTLS": {"enabled": False}})
    assert not [s for s in kinds(docs, "Secret") if s["metadata"]["name"] != "llmos-auth"]
    for name, (workload, _) in internal_tls_workloads(docs).items():
        c = container(workload)
        assert c["args"].count("--insecure") == 1, name
        assert not [a for a in c["args"] if a.startswith("--tls-")], name
        assert not [m for m in c["volumeMounts"] if m["mountPath"].startswith("/etc/llmos/tls")], name
        assert not [v for v in pod_spec(workload)["volumes"] if v["name"] == "internal-tls"], name
    # On by default: no --insecure anywhere.
    docs = render([VALUES_GPU])
    assert not [w["metadata"]["name"] for w in docs if w["kind"] in ("StatefulSet", "Job", "Pod")
                and "--insecure" in container(w).get("args", []) + container(w)["command"]]


def test_internal_tls_existing_secret():
    docs = render(values={"internalTLS": {"secretName": "llmos-certs"}})
    assert [s["metadata"]["name"] for s in kinds(docs, "Secret")] == ["llmos-auth"], "a TLS Secret rendered beside internalTLS.secretName"
    for name, (workload, role) in internal_tls_workloads(docs).items():
        found = tls_files(workload)
        assert [(found[f][1], found[f][2]) for f in TLS_FLAGS] == [
            ("llmos-certs", f"{role}.crt"), ("llmos-certs", f"{role}.key"), ("llmos-certs", "ca.crt")], name
        assert [found[f][0] for f in TLS_FLAGS] == [f"/etc/llmos/tls/{role}.crt", f"/etc/llmos/tls/{role}.key", "/etc/llmos/tls/ca.crt"], name


def test_internal_tls_cert_manager_secrets():
    values = {"internalTLS": {"coordinatorSecret": "llmos-coordinator-tls", "workerSecret": "llmos-worker-tls"}}
    docs = render([VALUES_GPU], values)
    assert [s["metadata"]["name"] for s in kinds(docs, "Secret")] == ["llmos-auth"], "a TLS Secret rendered beside cert-manager's"
    for name, (workload, role) in internal_tls_workloads(docs).items():
        found = tls_files(workload)
        # cert-manager's layout, mapped onto the paths the flags name.
        secret = f"llmos-{role}-tls"
        assert [(found[f][1], found[f][2]) for f in TLS_FLAGS] == [
            (secret, "tls.crt"), (secret, "tls.key"), (secret, "ca.crt")], name
        assert [found[f][0] for f in TLS_FLAGS] == [f"/etc/llmos/tls/{role}.crt", f"/etc/llmos/tls/{role}.key", "/etc/llmos/tls/ca.crt"], name


def test_notes_describe_internal_tls():
    def notes(*sets):
        args = [a for s in sets for a in ("--set", s)]
        r = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE, *args)
        assert r.returncode == 0, r.stderr
        return " ".join(r.stdout.split("NOTES:", 1)[1].split())

    flat = notes()
    assert "with mutual TLS: the CA and certificates the chart generated in the Secret llmos-internal-tls" in flat, flat
    assert "certificates from the Secret llmos-certs" in notes("internalTLS.secretName=llmos-certs")
    assert "certificates from the Secrets c and w" in notes("internalTLS.coordinatorSecret=c", "internalTLS.workerSecret=w")
    flat = notes("internalTLS.enabled=false")
    assert "plaintext and unauthenticated (internalTLS.enabled=false, --insecure): for development only" in flat, flat


# ---------------------------------------------------------------- optional resources


def test_optional_resources_only_when_enabled():
    for name, files in VALUE_SETS.items():
        docs = render(files)
        present = {d["kind"] for d in docs}
        for kind in ("NetworkPolicy", "ServiceMonitor", "PodMonitor", "ScaledObject", "HorizontalPodAutoscaler"):
            assert kind not in present, f"{kind} rendered by default ({name} values)"
        # Workers' metrics are scraped per pod (PodMonitor): no Service has a
        # metrics port, though every worker container has one.
        for d in kinds(docs, "Service"):
            assert all(p["name"] != "metrics" for p in d["spec"]["ports"]), d["metadata"]["name"]
        for sts in pools(docs).values():
            assert any(p["name"] == "metrics" for p in container(sts)["ports"]), sts["metadata"]["name"]


def test_network_policies():
    docs = render([VALUES_GPU], {"networkPolicy": {"enabled": True}})
    coord = one(docs, "NetworkPolicy", coord_name())
    assert coord["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "coordinator"
    public_rule, internal_rule = coord["spec"]["ingress"]
    # 50051 (gRPC) and 8000 (HTTP) from anywhere: no `from` in the rule.
    assert public_rule == {"ports": [{"port": 50051, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]}
    # The internal port only from this release's coordinator and worker pods.
    assert internal_rule["ports"] == [{"port": 50052, "protocol": "TCP"}]
    release = {"app.kubernetes.io/name": "llmos", "app.kubernetes.io/instance": RELEASE}
    assert internal_rule["from"] == [
        {"podSelector": {"matchLabels": {**release, "app.kubernetes.io/component": "coordinator"}}},
        {"podSelector": {"matchLabels": {**release, "app.kubernetes.io/component": "worker"}}},
    ]
    assert_internal_port_admits_only_coordinators_and_workers(docs, coord)
    workers = one(docs, "NetworkPolicy", "llmos-worker")
    sel = workers["spec"]["podSelector"]["matchLabels"]
    assert sel["app.kubernetes.io/component"] == "worker"
    rule, metrics_rule = workers["spec"]["ingress"]
    assert sorted(p["port"] for p in rule["ports"]) == [50061, 50062]
    [peer] = rule["from"]
    # The metrics port from anywhere (Prometheus runs elsewhere): no `from`.
    assert metrics_rule == {"ports": [{"port": 9091, "protocol": "TCP"}]}
    for sts in pools(docs).values():
        assert {"name": "metrics", "containerPort": 9091, "protocol": "TCP"} in container(sts)["ports"]
    assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "llmos", "app.kubernetes.io/instance": RELEASE}}}
    for sts in pools(docs).values():
        assert sel.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # Coordinators are pods of this release: they reach the workers.
    assert peer["podSelector"]["matchLabels"].items() <= one(docs, "StatefulSet", coord_name())["spec"]["template"]["metadata"]["labels"].items()


def policy_admits(policy, source_labels, port) -> bool:
    """Whether an Ingress NetworkPolicy lets a pod with `source_labels`, in
    the policy's namespace, reach `port` of the pods it selects (the rules'
    union; a rule without `ports` covers every port, one without `from`
    every source)."""
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p["port"] == port for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            # Only what the chart uses is evaluated here.
            assert set(peer) == {"podSelector"} and set(peer["podSelector"]) == {"matchLabels"}, peer
            if peer["podSelector"]["matchLabels"].items() <= source_labels.items():
                return True
    return False


def assert_internal_port_admits_only_coordinators_and_workers(docs, policy, internal=50052, release=RELEASE):
    """Follows the coordinators' policy from every pod the chart renders:
    the internal port admits the coordinators and every pool's workers,
    not the models Job, the test pod or a pod of another release; the
    public ports admit everyone."""
    coordinators = one(docs, "StatefulSet", coord_name(release if "llmos" in release else f"{release}-llmos"))
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(coordinators).items()
    workloads = {f'{w["kind"]}/{w["metadata"]["name"]}': pod_labels(w)
                 for w in docs if w["kind"] in ("StatefulSet", "Job", "Pod")}
    other = {"app.kubernetes.io/name": "llmos", "app.kubernetes.io/instance": "other",
             "app.kubernetes.io/component": "worker"}
    outsiders = {"a pod of another release": other, "a pod without labels": {}}
    admitted = sorted(w for w, labels in workloads.items() if policy_admits(policy, labels, internal))
    expected = sorted(w for w in workloads if w.startswith("StatefulSet/"))
    assert admitted == expected, f"the internal port {internal} admits {admitted}, expected {expected}"
    assert len(expected) >= 2, expected
    assert any(w.startswith(("Job/", "Pod/")) for w in workloads), "no CLI pod rendered to check"
    for what, labels in outsiders.items():
        assert not policy_admits(policy, labels, internal), what
    for port in (50051, 8000):
        for what, labels in {**workloads, **outsiders}.items():
            assert policy_admits(policy, labels, port), f"public port {port} refuses {what}"


def test_network_policy_internal_port_follows_the_value_and_release():
    docs = render([VALUES_GPU], {"networkPolicy": {"enabled": True}, "coordinator": {"internalPort": 7070}},
                  release="prod")
    policy = one(docs, "NetworkPolicy", "prod-llmos-coordinator")
    assert [p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]] == [50051, 8000, 7070]
    assert set(pools(docs)) == {"gpu", "cpu"}
    assert_internal_port_admits_only_coordinators_and_workers(docs, policy, internal=7070, release="prod")
    # The default internal port is closed to pods outside: 7070 is not 50052.
    assert not policy_admits(policy, {}, 50052)


def test_internal_port_value_moves_every_use():
    docs = render(values={"coordinator": {"internalPort": 6000}})
    c = container(one(docs, "StatefulSet", coord_name()))
    assert flag(c["args"], "internal-listen") == "$(POD_IP):6000"
    assert flag(c["args"], "listen") == "$(POD_IP):50051"
    assert {"name": "internal", "containerPort": 6000, "protocol": "TCP"} in c["ports"]
    assert flag(c["args"], "peers") == ",".join(expected_peers(3, port=6000))
    assert flag(c["args"], "advertise").endswith(".llmos-coordinator-peers.llmos-test.svc.cluster.local:6000")
    assert flag(container(pools(docs)["cpu"])["args"], "coordinator") == ",".join(internal_urls(3, port=6000))
    peers = one(docs, "Service", "llmos-coordinator-peers")
    assert [(p["port"], p["targetPort"]) for p in peers["spec"]["ports"]] == [(6000, "internal")]
    client = one(docs, "Service", coord_name())
    assert all(p["port"] != 6000 and p["targetPort"] != "internal" for p in client["spec"]["ports"])
    # The internal plane needs a port of its own.
    for taken in (50051, 8000):
        err = render_error(values={"coordinator": {"internalPort": taken}})
        assert f"coordinator.internalPort ({taken})" in err and "pick another" in err, err
    for bad in (0, 70000, "50052"):
        assert "/coordinator/internalPort" in render_error(values={"coordinator": {"internalPort": bad}})


def test_service_monitor():
    docs = render(values={"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    sm = one(docs, "ServiceMonitor", "llmos")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    # The coordinators serve /metrics on their HTTP port; the workers are
    # scraped per pod by the PodMonitor, not through a Service.
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    selected = [s for s in kinds(docs, "Service")
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert sorted(s["metadata"]["name"] for s in selected) == ["llmos-coordinator"]
    assert any(p["name"] == "http" for p in selected[0]["spec"]["ports"])


def test_network_policy_follows_the_metrics_port():
    docs = render(values={"networkPolicy": {"enabled": True}, "worker": {"metricsPort": 9400}})
    _, metrics_rule = one(docs, "NetworkPolicy", "llmos-worker")["spec"]["ingress"]
    assert metrics_rule == {"ports": [{"port": 9400, "protocol": "TCP"}]}
    # The coordinators' policy is unchanged: the public rule and the internal one.
    public_rule, internal_rule = one(docs, "NetworkPolicy", coord_name())["spec"]["ingress"]
    assert [p["port"] for p in public_rule["ports"]] == [50051, 8000]
    assert [p["port"] for p in internal_rule["ports"]] == [50052]


def pod_labels(workload):
    if workload["kind"] == "Pod":
        return workload["metadata"].get("labels", {})
    return workload["spec"]["template"]["metadata"].get("labels", {})


def test_pod_monitor_scrapes_the_workers():
    assert not kinds(render([VALUES_GPU]), "PodMonitor")
    assert not kinds(render([VALUES_GPU], {"metrics": {"serviceMonitor": {"enabled": False}}}), "PodMonitor")
    m = {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}
    docs = render([VALUES_GPU], {"metrics": {"serviceMonitor": m}})
    pm = one(docs, "PodMonitor", "llmos-worker")
    sm = one(docs, "ServiceMonitor", "llmos")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["namespace"] == NAMESPACE
    assert pm["metadata"]["labels"]["release"] == "prom"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    # The pool becomes a label of every worker series.
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_llmos_io_pool"], "targetLabel": "pool"} in endpoint["relabelings"]
    # It selects every pool's worker pods, and nothing else of the release.
    sel = pm["spec"]["selector"]["matchLabels"]
    assert sel == {"app.kubernetes.io/name": "llmos", "app.kubernetes.io/instance": RELEASE,
                   "app.kubernetes.io/component": "worker"}
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Job", "Pod")]
    selected = [w for w in workloads if sel.items() <= pod_labels(w).items()]
    assert sorted(w["metadata"]["name"] for w in selected) == ["llmos-worker-cpu", "llmos-worker-gpu"]
    for sts in selected:
        assert "metrics" in {p["name"] for p in container(sts)["ports"]}
    # Another release's PodMonitor selects that release's workers.
    other = one(render(values={"metrics": {"serviceMonitor": {"enabled": True}}}, release="prod"),
                "PodMonitor", "prod-llmos-worker")
    assert other["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "prod"


def test_keda_scaled_object_per_pool():
    values = {"autoscaling": {"enabled": True, "kind": "keda", "maxReplicas": 6}}
    docs = render([VALUES_GPU], values)
    objects = {d["spec"]["scaleTargetRef"]["name"]: d for d in kinds(docs, "ScaledObject")}
    assert set(objects) == {"llmos-worker-gpu", "llmos-worker-cpu"}
    gpu = objects["llmos-worker-gpu"]
    assert gpu["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert gpu["spec"]["maxReplicaCount"] == 6
    [trigger] = gpu["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == f'max(sum by (pod) (llmos_requests_waiting{{namespace="{NAMESPACE}", pool="gpu"}}))'
    # The autoscaler owns the replica count.
    for sts in pools(docs).values():
        assert "replicas" not in sts["spec"]
    # A pool can opt out.
    gpu_values = yaml.safe_load(VALUES_GPU.read_text())
    gpu_values["workerPools"][1]["autoscaling"] = {"enabled": False}
    docs = render([VALUES_GPU], {**values, "workerPools": gpu_values["workerPools"]})
    assert [d["spec"]["scaleTargetRef"]["name"] for d in kinds(docs, "ScaledObject")] == ["llmos-worker-gpu"]
    assert pools(docs)["cpu"]["spec"]["replicas"] == 1


def test_hpa_per_pool():
    docs = render(values={"autoscaling": {"enabled": True, "kind": "hpa", "minReplicas": 2, "maxReplicas": 5}})
    [hpa] = kinds(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "llmos-worker-cpu"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert not kinds(docs, "ScaledObject")


# ---------------------------------------------------------------- pods in general


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_pod_runs_non_root_read_only(name):
    docs = render(VALUE_SETS[name])
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Job", "Pod")]
    assert len(workloads) >= 4
    for w in workloads:
        what = f'{w["kind"]}/{w["metadata"]["name"]}'
        spec = pod_spec(w)
        sc = spec["securityContext"]
        assert (sc["runAsNonRoot"], sc["runAsUser"], sc["fsGroup"]) == (True, 10001, 10001), what
        assert spec["automountServiceAccountToken"] is False, what
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, what
            assert csc["readOnlyRootFilesystem"] is True, what
            assert csc.get("privileged") is not True, what
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            volume = next(v for v in spec["volumes"] if v["name"] == tmp["name"])
            assert "emptyDir" in volume, what
            assert c["image"] == ("llmos:0.1.0-cuda" if name == "gpu" else "llmos:0.1.0"), what
            assert c["imagePullPolicy"] == "IfNotPresent", what
            assert c["command"][0].startswith("/usr/local/bin/llmos"), what


def test_image_values():
    docs = render(values={"image": {"repository": "registry.example/llmos", "tag": "0.2.0-cuda", "pullPolicy": "Always"},
                          "imagePullSecrets": [{"name": "regcred"}]})
    for w in (d for d in docs if d["kind"] in ("StatefulSet", "Job", "Pod")):
        c = container(w)
        assert c["image"] == "registry.example/llmos:0.2.0-cuda"
        assert c["imagePullPolicy"] == "Always"
        assert pod_spec(w)["imagePullSecrets"] == [{"name": "regcred"}]


def test_services_target_named_container_ports():
    docs = render([VALUES_GPU], {"metrics": {"serviceMonitor": {"enabled": True}}})
    workloads = kinds(docs, "StatefulSet")
    for svc in kinds(docs, "Service"):
        matching = [w for w in workloads
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, f'Service {svc["metadata"]["name"]} selects {len(matching)} workloads'
        ports = {p["name"] for p in container(matching[0])["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f'{svc["metadata"]["name"]}: {p["targetPort"]} not in {ports}'


def test_notes_say_how_to_call_the_api():
    r = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} port-forward svc/llmos-coordinator 50051:50051" in notes
    assert "llmos --coordinator http://127.0.0.1:50051 generate --model smollm2 --prompt hi" in notes
    assert f"helm test {RELEASE}" in notes
    # How to read the admin key and make tenants' keys.
    assert (f"export LLMOS_API_KEY=$(kubectl -n {NAMESPACE} get secret llmos-auth "
            "-o jsonpath='{.data.admin-key}' | base64 -d)") in notes
    assert "llmos --coordinator http://127.0.0.1:50051 keys create --tenant team-a --role user" in notes
    # Which port is which: the public one with keys, the internal one for
    # the cluster's pods only (and how to enforce that).
    flat = " ".join(notes.split())
    assert "50051 (gRPC) and 8000 (HTTP): the public API, on the client Service llmos-coordinator; API keys guard it." in flat
    assert ("50052 (internal): the worker registry and Raft between coordinators, "
            "on the headless Service llmos-coordinator-peers only") in flat
    assert "set networkPolicy.enabled to admit only this release's coordinator and worker pods" in flat
    assert "carries both" not in flat
    r = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                 "--set", "networkPolicy.enabled=true", "--set", "coordinator.internalPort=7070")
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split("NOTES:", 1)[1].split())
    assert "7070 (internal)" in flat, flat
    assert "the NetworkPolicy llmos-coordinator admits only this release's coordinator and worker pods" in flat, flat
    r = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                 "--set", "auth.existingSecret=team-keys", "--set", "auth.secretKey=tls.key")
    assert r.returncode == 0, r.stderr
    assert "get secret team-keys -o jsonpath='{.data.tls\\.key}'" in r.stdout.split("NOTES:", 1)[1]
    r = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE, "--set", "auth.enabled=false")
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    assert "LLMOS_API_KEY" not in notes and "API keys are off" in notes


# ---------------------------------------------------------------- values.yaml


def test_values_yaml_documents_every_key():
    """Every key has a `# --` comment, unless it is a group of keys that do."""
    keys = values_yaml_keys()
    missing = [f"line {n}: {path}" for path, documented, n, group in keys if not documented and not group]
    assert not missing, "values.yaml keys without a `# --` comment:\n" + "\n".join(missing)
    assert len(keys) > 50


def test_docs_list_every_value():
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    absent = [path for path, documented, _, _ in values_yaml_keys() if documented and f"| `{path}` |" not in docs]
    assert not absent, f"docs/kubernetes.md's value table lacks: {absent}"
