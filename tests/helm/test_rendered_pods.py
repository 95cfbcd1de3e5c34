"""The chart's rendered pods, run for real (issue 22).

Renders helm/llmos with values-cpu.yaml and runs every pod as Kubernetes
would, one container per pod on its own loopback address (see pods.py):
3 coordinators elect a leader through the headless Service's names on the
internal port, over mutual TLS with the certificates the chart generates
(internalTLS, the rendered Secret <fullname>-internal-tls); each one's
public port answers the worker Registry and Raft UNIMPLEMENTED while its
internal port refuses a plaintext client and answers the Registry to a
client holding the workers' certificate; 2 workers register through the
headless Service's names on the internal port (their own gRPC port, on
mutual TLS too, answers health only to a certificate of the CA), the
post-install Job applies the chart's models, the `helm test` pod generates. The coordinators
read the bootstrap admin key from the rendered Secret; the Job, the test pod
and this test's CLI calls send it, a call without it is refused, and a
tenant key made with `llmos keys create` serves the HTTP API on every
coordinator. Then the worker
pool is scaled by re-rendering with one more replica (the new pod registers),
a worker holding a stage gets SIGTERM and drains (its replica is replaced
on the new workers first, then it exits by itself), `helm test` generates
again, and an upgrade asking for 2 replicas re-runs the models Job, which
scales the model (with the installed admin key: see Cluster.upgrade).

Runtime: podman with the image scripts/image.sh built ($LLMOS_IMAGE,
default localhost/llmos:0.1.0); where podman cannot run, the same command
lines as plain processes, and the test prints that it did.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import grpc

import pods

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "llmos")
VALUES = os.path.join(CHART, "values-cpu.yaml")
NS = "llmos"
IMAGE = os.environ.get("LLMOS_IMAGE", "localhost/llmos:0.1.0")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/llmos/target"))
BINARIES = {b: os.path.join(TARGET, "release", b) for b in ("llmos", "llmos-coordinator", "llmos-worker")}


def say(msg):
    # Shown in a passing run too (pytest -s is not assumed).
    sys.__stderr__.write(f"[rendered-pods] {msg}\n")
    sys.__stderr__.flush()


def run_cli(pod, *args, key, timeout=60):
    """The llmos CLI against a pod's address (what an operator would run),
    sending `key` as LLMOS_API_KEY (None: no key at all)."""
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_API_KEY"}
    if key is not None:
        env["LLMOS_API_KEY"] = key
    return subprocess.run(
        [BINARIES["llmos"], "--coordinator", f"http://{pod.ip}:{pod.port('grpc')}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def cli(pod, *args, key, timeout=60):
    r = run_cli(pod, *args, key=key, timeout=timeout)
    assert r.returncode == 0, f"llmos {' '.join(args)}: {r.stderr[-2000:]}"
    return json.loads(r.stdout)


def admin_key(cluster):
    """The bootstrap admin key: what the coordinators' --admin-key-file
    names, read from the rendered Secret their volume mounts."""
    (sts,) = [s for s in cluster.of_kind("StatefulSet") if s["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"]
    spec = sts["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    path = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--admin-key-file="))
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    source = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
    file = os.path.relpath(path, mount["mountPath"])
    item = next(it for it in source["items"] if it["path"] == file)
    key = cluster.secret_data(source["secretName"])[item["key"]]
    assert len(key) >= 20, "the admin key has fewer than 20 characters"
    return key


def post_chat(url, key, timeout=60):
    """An OpenAI chat completion; `key` goes in `Authorization: Bearer` (None: no header)."""
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}).encode()
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as r:
        return json.loads(r.read())


def wait_until(what, check, timeout):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout} s (last: {last})")


def tenant_chat(url, key):
    """A chat completion with a key just made: None while this coordinator
    has not applied it yet (401), any other refusal raised."""
    try:
        return post_chat(url, key)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            return None
        raise


def tls_files(cluster, component):
    """What the component's pods read as --tls-cert, --tls-key and
    --tls-ca, followed from the flags to the mounted Secret's keys (PEM
    bytes by flag name); None when its internal plane is plaintext
    (--insecure)."""
    (sts,) = [s for s in cluster.of_kind("StatefulSet") if s["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    spec = sts["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    if "--insecure" in c["args"]:
        return None
    out = {}
    for name in ("tls-cert", "tls-key", "tls-ca"):
        path = next(a.split("=", 1)[1] for a in c["args"] if a.startswith(f"--{name}="))
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
        source = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
        item = next(it for it in source["items"] if it["path"] == os.path.relpath(path, mount["mountPath"]))
        out[name] = cluster.secret_data(source["secretName"])[item["key"]].encode()
    return out


def client_tls(files, server_name):
    """A mutual-TLS client holding `files`' certificate, expecting a server
    of the role `server_name` names."""
    return pods.ClientTLS(ca=files["tls-ca"], cert=files["tls-cert"], key=files["tls-key"], server_name=server_name)


REGISTRY_HEARTBEAT = "/llmos.worker.v1.Registry/Heartbeat"
PEER_RAFT = "/llmos.coordinator.v1.Peer/Raft"
ADMIN_STATUS = "/llmos.v1.Admin/ClusterStatus"


def check_planes(coordinators, as_worker):
    """On every coordinator: the public port answers the internal plane's
    services UNIMPLEMENTED (and the public API, keyless, UNAUTHENTICATED:
    it is served there); the internal port, to a client with the workers'
    certificate (`as_worker`, mutual TLS), answers a Heartbeat (an empty
    one: worker id "", which the leader answers `known: false`, the empty
    message; a follower forwards it there) and answers the public API
    UNIMPLEMENTED; a plaintext client gets nothing there (UNAVAILABLE: no
    TLS handshake)."""
    for p in coordinators:
        public = f"{p.ip}:{p.port('grpc')}"
        internal = f"{p.ip}:{p.port('internal')}"
        assert public != internal, p.name
        for method in (REGISTRY_HEARTBEAT, PEER_RAFT):
            code, _ = pods.grpc_unary(public, method)
            assert code == grpc.StatusCode.UNIMPLEMENTED, f"{p.name}: {method} on the public port {public}: {code}"
        code, _ = pods.grpc_unary(public, ADMIN_STATUS)
        assert code == grpc.StatusCode.UNAUTHENTICATED, f"{p.name}: keyless {ADMIN_STATUS} on the public port: {code}"

        code, _ = pods.grpc_unary(internal, REGISTRY_HEARTBEAT)
        assert code == grpc.StatusCode.UNAVAILABLE, f"{p.name}: a plaintext {REGISTRY_HEARTBEAT} on the internal port {internal} (mutual TLS): {code}"

        def heartbeat_answered():
            code, reply = pods.grpc_unary(internal, REGISTRY_HEARTBEAT, tls=as_worker)
            # UNAVAILABLE: a follower that has not yet learned the leader's
            # address; anything else is an answer to judge.
            return None if code == grpc.StatusCode.UNAVAILABLE else (code, reply)

        code, reply = wait_until(f"{p.name} answers a Heartbeat on its internal port", heartbeat_answered, 20)
        assert (code, reply) == (grpc.StatusCode.OK, b""), f"{p.name}: {REGISTRY_HEARTBEAT} on the internal port {internal}: {code} {reply!r}"
        code, _ = pods.grpc_unary(internal, ADMIN_STATUS, tls=as_worker)
        assert code == grpc.StatusCode.UNIMPLEMENTED, f"{p.name}: {ADMIN_STATUS} on the internal port {internal}: {code}"


HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def check_worker_tls(workers, as_coordinator):
    """On every worker: its gRPC port (the Worker API, health) takes only
    mutual-TLS clients: health answers a client with the coordinators'
    certificate (`as_coordinator`), and a plaintext one gets nothing
    (what the kubelet's gRPC probe would be; the chart probes the
    plaintext metrics port instead)."""
    for p in workers:
        address = f"{p.ip}:{p.port('grpc')}"
        code, reply = pods.grpc_unary(address, HEALTH_CHECK, tls=as_coordinator)
        # grpc.health.v1.HealthCheckResponse{status: SERVING (1)}.
        assert (code, reply) == (grpc.StatusCode.OK, b"\x08\x01"), f"{p.name}: {HEALTH_CHECK} over mutual TLS on {address}: {code} {reply!r}"
        code, _ = pods.grpc_unary(address, HEALTH_CHECK)
        assert code == grpc.StatusCode.UNAVAILABLE, f"{p.name}: a plaintext {HEALTH_CHECK} on {address}: {code}"


def sets(image):
    repo, tag = image.rsplit(":", 1)
    return [f"image.repository={repo}", f"image.tag={tag}"]


def run_to_end(cluster, pod, timeout):
    cluster.start(pod)
    code = cluster.exit_code(pod, timeout)
    out = cluster.logs(pod)
    assert code == 0, f"pod {pod.name} exited {code}:\n{out[-3000:]}"
    return out


def test_the_rendered_chart_forms_a_working_cluster():
    why_not = pods.podman_usable(IMAGE)
    runtime = pods.PODMAN if why_not is None and os.environ.get("LLMOS_PODS_RUNTIME") != "process" else pods.PROCESS
    if runtime == pods.PROCESS:
        say(f"podman not used ({why_not or 'LLMOS_PODS_RUNTIME=process'}): running the rendered command lines as plain processes")
        for b in BINARIES.values():
            assert os.path.exists(b), f"{b} is not built (cargo build --release --workspace --bins)"
    else:
        say(f"running the rendered pods as podman containers of {IMAGE}")
    docs = pods.render(CHART, [VALUES], NS, sets(IMAGE))
    workdir = tempfile.mkdtemp(prefix="llmos-pods-")
    cluster = pods.Cluster(docs, NS, runtime, IMAGE, workdir, BINARIES)
    key = admin_key(cluster)
    t0 = time.time()
    try:
        # Coordinators: a StatefulSet with podManagementPolicy Parallel.
        coord_sts = [s for s in cluster.of_kind("StatefulSet") if s["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"]
        assert len(coord_sts) == 1, "one coordinator StatefulSet"
        assert coord_sts[0]["spec"]["podManagementPolicy"] == "Parallel"
        coordinators = cluster.statefulset_pods(coord_sts[0]["metadata"]["name"])
        assert len(coordinators) == 3
        for p in coordinators:
            cluster.start(p)
        cluster.wait_ready(coordinators, timeout=60)

        def one_leader():
            views = [cli(p, "status", key=key)["control_plane"] for p in coordinators]
            leaders = {v["leader_id"] for v in views}
            members = {len(v["members"]) for v in views}
            return views if len(leaders) == 1 and 0 not in leaders and members == {3} else None

        views = wait_until("one leader known to all 3 coordinators", one_leader, 60)
        say(f"3 coordinators ready, leader {views[0]['leader']} ({time.time() - t0:.1f} s)")
        # Keys are required: each coordinator says so and refuses a call
        # without a key, or with a key that is not one of the cluster's.
        assert [v["auth"] for v in views] == ["required"] * 3, views
        for p in coordinators:
            for wrong in (None, "x" * len(key)):
                r = run_cli(p, "status", key=wrong)
                assert r.returncode != 0 and "Unauthenticated" in r.stderr, (p.name, wrong is None, r.stderr[-1000:])
        say("API keys required: `llmos status` without the admin key is refused (Unauthenticated)")

        # Two planes on two ports. The public port (container port grpc,
        # the client Service's) serves no internal service; the internal
        # port (container port internal, the headless Service's) serves the
        # worker Registry, which takes no key, and not the public API.
        # The internal port is on mutual TLS with the chart's certificates:
        # each coordinator says so, and a client needs the workers'
        # certificate there (a plaintext one is refused).
        coordinator_tls, worker_tls = tls_files(cluster, "coordinator"), tls_files(cluster, "worker")
        assert coordinator_tls and worker_tls, "the chart's default is mutual TLS on the internal plane"
        assert coordinator_tls["tls-ca"] == worker_tls["tls-ca"], "coordinators and workers trust different CAs"
        for p, v in zip(coordinators, views):
            assert "internal plane on mutual TLS" in cluster.logs(p), f"{p.name} does not say it runs on mutual TLS:\n{cluster.logs(p)[-2000:]}"
            assert v["internal_tls"].startswith("mutual TLS (this coordinator: a coordinator)"), (p.name, v["internal_tls"])
        check_planes(coordinators, client_tls(worker_tls, "coordinator.llmos"))
        say(f"planes: public port {coordinators[0].port('grpc')} answers Registry/Peer UNIMPLEMENTED; "
            f"internal port {coordinators[0].port('internal')} (mutual TLS: plaintext refused) answers Registry, not Admin")

        # Workers: the pool's StatefulSet.
        worker_sts = [s for s in cluster.of_kind("StatefulSet") if s["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]
        assert [s["metadata"]["name"] for s in worker_sts] == ["llmos-worker-cpu"]
        workers = cluster.statefulset_pods("llmos-worker-cpu")
        assert len(workers) == 2
        for p in workers:
            cluster.start(p)
        cluster.wait_ready(workers, timeout=60)

        def registered_ids():
            pools = cli(coordinators[0], "workers", key=key)
            return sorted(w["id"] for ws in pools.values() for w in ws if w["healthy"] and not w["gone"])

        def registered(n):
            ids = registered_ids()
            return ids if len(ids) == n else None

        ids = wait_until("2 workers registered", lambda: registered(2), 60)
        assert ids == ["llmos-worker-cpu-0", "llmos-worker-cpu-1"], ids
        check_worker_tls(workers, client_tls(coordinator_tls, "worker.llmos"))
        say(f"workers on mutual TLS: port {workers[0].port('grpc')} answers health to the coordinators' certificate, not to plaintext")
        pools = cli(coordinators[0], "workers", key=key)
        assert list(pools) == ["cpu"], f"workers grouped by pool: {pools}"
        say(f"workers registered: {ids} ({time.time() - t0:.1f} s)")

        # The post-install Job applies the chart's models.
        job = cluster.job_pod("llmos-models")
        out = run_to_end(cluster, job, timeout=300)
        assert '"applied"' in out and "smollm2" in out, out
        model = next(m for m in cli(coordinators[1], "status", key=key)["models"] if m["name"] == "smollm2")
        assert model["state"] == "Ready" and len(model["stages"]) == 2, model
        say(f"models Job applied smollm2 ({time.time() - t0:.1f} s)")

        # helm test: the rendered test pod generates.
        (test_pod,) = cluster.test_pods()
        out = run_to_end(cluster, test_pod, timeout=120)
        assert "finish" in out.lower() and "generated" in out, out
        say(f"helm test pod generated: {out.strip().splitlines()[0]!r}")

        # The OpenAI HTTP API on the port the chart opens, on every coordinator.
        http_port = coordinators[0].port("http")
        # A tenant key, made as NOTES.txt says, serves it on every
        # coordinator; no key gets 401 with a Bearer challenge.
        tenant = cli(coordinators[0], "keys", "create", "--tenant", "team-a", "--role", "user", key=key)
        assert (tenant["tenant"], tenant["role"]) == ("team-a", "user") and tenant["key"], tenant
        for c in coordinators:
            url = f"http://{c.ip}:{http_port}/v1/chat/completions"
            try:
                post_chat(url, None)
                raise AssertionError(f"{c.name}: a chat completion without a key was served")
            except urllib.error.HTTPError as e:
                assert e.code == 401 and e.headers.get("www-authenticate", "").startswith("Bearer"), (c.name, e.code, dict(e.headers))
            answer = wait_until(f"{c.name} serves the tenant key", lambda: tenant_chat(url, tenant["key"]), 30)
            assert answer["choices"][0]["message"]["content"], answer
        say(f"HTTP chat completion on port {http_port} of each coordinator with a tenant key (401 without): {answer['choices'][0]['message']['content']!r}")
        # What the chart's ServiceMonitor scrapes (no key: auth.metricsNeedKey
        # is off), and the pool label its autoscaler query selects on.
        with urllib.request.urlopen(f"http://{coordinators[0].ip}:{http_port}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert 'llmos_requests_waiting{model="smollm2",pool="cpu"}' in metrics, metrics[-2000:]

        # Scale the pool one replica at a time: re-render with one more,
        # start the new pod, see it register. Two more make room for a
        # whole replacement replica (a drain places one before the old
        # replica lets go; it does not move single stages).
        for n in (3, 4):
            cluster.upgrade(pods.render(CHART, [VALUES], NS, sets(IMAGE) + [f"workerPools[0].replicas={n}"]))
            new = [p for p in cluster.statefulset_pods("llmos-worker-cpu") if p.name not in cluster.pods]
            assert [p.name for p in new] == [f"llmos-worker-cpu-{n - 1}"]
            cluster.start(new[0])
            cluster.wait_ready(new, timeout=60)
            wait_until(f"worker {n} registered", lambda: registered(n), 60)
            say(f"pool scaled to {n}: {new[0].name} registered ({time.time() - t0:.1f} s)")

        # SIGTERM a worker holding a stage: it drains (a replacement replica
        # on the new workers, then the old one lets go) and exits by itself
        # within its grace period.
        holder = model["stages"][1]["worker"]
        before = {st["worker"] for st in model["stages"]}
        victim = cluster.pods[holder]
        grace = victim.spec["terminationGracePeriodSeconds"]
        cluster.signal(victim, signal.SIGTERM)
        code = cluster.exit_code(victim, timeout=grace)
        assert code == 0, f"{holder} exited {code} after SIGTERM:\n{cluster.logs(victim)[-3000:]}"

        def moved():
            m = next(m for m in cli(coordinators[2], "status", key=key)["models"] if m["name"] == "smollm2")
            placed = {s["worker"] for s in m["stages"]}
            return m if m["state"] == "Ready" and holder not in placed else None

        model = wait_until("smollm2 Ready without the drained worker", moved, 120)
        placed = [s["worker"] for s in model["stages"]]
        assert set(placed) == {"llmos-worker-cpu-2", "llmos-worker-cpu-3"}, f"{before} -> {placed}; {holder}'s log:\n{cluster.logs(victim)[-3000:]}"
        say(f"SIGTERM to {holder}: drained and exited 0; smollm2 now on {placed} ({time.time() - t0:.1f} s)")

        # And the chart's test still passes.
        again = cluster.test_pods()[0]
        again.name = again.name + "-again"
        out = run_to_end(cluster, again, timeout=120)
        assert "generated" in out, out
        say(f"helm test after the drain: ok ({time.time() - t0:.1f} s)")

        # An upgrade asking for 2 replicas (and a fifth worker to hold the
        # second): the post-upgrade Job runs again and scales the model.
        cluster.upgrade(pods.render(CHART, [VALUES], NS, sets(IMAGE) + ["workerPools[0].replicas=5", "models[0].replicas=2"]))
        assert admin_key(cluster) == key, "the upgrade changed the admin key"
        assert (tls_files(cluster, "coordinator"), tls_files(cluster, "worker")) == (coordinator_tls, worker_tls), "the upgrade changed the internal TLS certificates"
        fifth = cluster.statefulset_pods("llmos-worker-cpu")[4]
        cluster.start(fifth)
        cluster.wait_ready([fifth], timeout=60)
        wait_until("the fifth worker registered", lambda: fifth.name in (registered_ids() or []), 60)
        out = run_to_end(cluster, cluster.job_pod("llmos-models", attempt=1), timeout=300)
        assert "smollm2: scale 1 -> 2 replicas" in out, out
        model = next(m for m in cli(coordinators[0], "status", key=key)["models"] if m["name"] == "smollm2")
        assert model["replicas_desired"] == 2 and [r["state"] for r in model["replicas"]] == ["Ready", "Ready"], model
        say(f"upgrade with models[0].replicas=2: the Job scaled smollm2 to 2 Ready replicas; whole run {time.time() - t0:.1f} s ({runtime})")
    finally:
        cluster.stop_all()
