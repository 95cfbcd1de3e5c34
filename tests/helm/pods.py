"""Runs what `helm template` renders as if a cluster ran it, on one machine.

Every pod the chart renders (StatefulSet replicas, hook Jobs, the `helm test`
Pod) becomes a podman container on the host network with an address of its
own on loopback (127.X.Y.Z): the downward API gives it that address as
`status.podIP`, its name and namespace; its command and args get Kubernetes'
`$(VAR)` expansion; its volumes are local directories (a PersistentVolumeClaim
template, an emptyDir) or files written from the rendered ConfigMaps and
Secrets, and its `configMapKeyRef`/`secretKeyRef` variables come from them; the
Services' DNS names (`<pod>.<headless service>.<ns>.svc.<domain>`, a
ClusterIP Service's name) are `--add-host` entries. Readiness is the
rendered probe: a gRPC health check (grpc.health.v1) or a TCP connection
on the pod's address.

Where podman cannot run, `PROCESS` runs the same command lines as plain
processes (the image's binaries replaced by the release build, mount paths
by the local directories, the Services' DNS names by their addresses) and
the test says so.

No traffic leaves loopback: every address is 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

PODMAN = "podman"
PROCESS = "process"


def render(chart: str, values: list[str], namespace: str, sets: list[str], release="llmos") -> list[dict]:
    """`helm template` with hooks and tests included: every document."""
    cmd = ["helm", "template", release, chart, "--namespace", namespace]
    for v in values:
        cmd += ["-f", v]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an
    undefined one left as is, `$$` escapes."""

    def sub(m):
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        name = m.group(1)
        return env.get(name, m.group(0))

    return re.sub(r"\$\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


@dataclass
class Pod:
    name: str
    namespace: str
    spec: dict
    labels: dict
    ip: str
    hostname: str
    subdomain: str | None
    kind: str  # StatefulSet, Job, Pod
    owner: str
    handle: object = None  # container name or Popen
    dirs: dict = field(default_factory=dict)  # volume name -> host dir
    log_path: str = ""

    @property
    def container(self) -> dict:
        return self.spec["containers"][0]

    def port(self, name: str) -> int:
        """The container port named `name` (as a Service's targetPort names it)."""
        found = [p["containerPort"] for p in self.container.get("ports", []) if p["name"] == name]
        assert len(found) == 1, f"pod {self.name}: container port {name!r} declared {len(found)} times"
        return found[0]


class Cluster:
    """The pods of one rendered release, started on demand."""

    def __init__(self, docs, namespace, runtime, image, workdir, binaries, domain="cluster.local"):
        self.docs = docs
        self.ns = namespace
        self.runtime = runtime
        self.image = image
        self.workdir = workdir
        self.binaries = binaries
        self.domain = domain
        # A second octet of our own: containers of another run do not clash.
        self.octet = 100 + os.getpid() % 100
        self.next_ip = 1
        self.ips: dict[str, str] = {}
        self.pods: dict[str, Pod] = {}
        self.volume_dirs: dict[str, str] = {}  # "<pod>/<claim>" -> dir, kept across restarts

    # -- what was rendered ----------------------------------------------
    def of_kind(self, kind):
        return [d for d in self.docs if d.get("kind") == kind]

    def find(self, kind, name):
        for d in self.of_kind(kind):
            if d["metadata"]["name"] == name:
                return d
        raise KeyError(f"no {kind} {name} in the rendered chart")

    def upgrade(self, docs):
        """`helm upgrade` to what `docs` renders. A Secret already installed
        keeps its data: the chart's `lookup` finds it and renders it again,
        which `helm template` (no cluster to look in) cannot do, so each of
        its renders has a new random key."""
        installed = {d["metadata"]["name"]: d for d in self.of_kind("Secret")}
        self.docs = [installed.get(d["metadata"]["name"], d) if d.get("kind") == "Secret" else d for d in docs]

    def secret_data(self, name) -> dict[str, str]:
        """A rendered Secret's keys and values: `data` decoded, `stringData` over it."""
        secret = self.find("Secret", name)
        out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        out.update(secret.get("stringData") or {})
        return out

    def ip_of(self, pod_name):
        if pod_name not in self.ips:
            n = self.next_ip
            self.next_ip += 1
            self.ips[pod_name] = f"127.{self.octet}.{n // 250}.{n % 250 + 1}"
        return self.ips[pod_name]

    def statefulset_pods(self, sts_name) -> list[Pod]:
        sts = self.find("StatefulSet", sts_name)
        out = []
        for i in range(sts["spec"].get("replicas", 1)):
            name = f"{sts_name}-{i}"
            tpl = sts["spec"]["template"]
            labels = dict(tpl["metadata"].get("labels", {}))
            labels["statefulset.kubernetes.io/pod-name"] = name
            labels["apps.kubernetes.io/pod-index"] = str(i)
            out.append(
                Pod(
                    name=name,
                    namespace=self.ns,
                    spec=tpl["spec"],
                    labels=labels,
                    ip=self.ip_of(name),
                    hostname=name,
                    subdomain=sts["spec"].get("serviceName"),
                    kind="StatefulSet",
                    owner=sts_name,
                )
            )
        return out

    def job_pod(self, job_name, attempt=0) -> Pod:
        job = self.find("Job", job_name)
        name = f"{job_name}-{attempt}"
        tpl = job["spec"]["template"]
        return Pod(name, self.ns, tpl["spec"], dict(tpl["metadata"].get("labels", {})), self.ip_of(name), name, None, "Job", job_name)

    def test_pods(self) -> list[Pod]:
        out = []
        for d in self.of_kind("Pod"):
            if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test":
                name = d["metadata"]["name"]
                out.append(Pod(name, self.ns, d["spec"], dict(d["metadata"].get("labels", {})), self.ip_of(name), name, None, "Pod", name))
        return out

    # -- DNS ------------------------------------------------------------
    def hosts(self) -> list[tuple[str, str]]:
        """Every name the rendered Services give, for every pod known."""
        known = dict(self.pods)
        for sts in self.of_kind("StatefulSet"):
            for p in self.statefulset_pods(sts["metadata"]["name"]):
                known.setdefault(p.name, p)
        entries = []

        def names(base):
            return [base, f"{base}.{self.ns}", f"{base}.{self.ns}.svc", f"{base}.{self.ns}.svc.{self.domain}"]

        for svc in self.of_kind("Service"):
            sname = svc["metadata"]["name"]
            sel = svc["spec"].get("selector") or {}
            chosen = sorted(
                (p for p in known.values() if sel and all(p.labels.get(k) == v for k, v in sel.items())),
                key=lambda p: p.name,
            )
            headless = svc["spec"].get("clusterIP") == "None"
            for p in chosen:
                if headless and p.subdomain == sname:
                    for n in names(f"{p.hostname}.{sname}"):
                        entries.append((n, p.ip))
            if chosen:
                # A ClusterIP Service is one virtual address; here, the first
                # selected pod's (followers forward what needs the leader).
                for n in names(sname):
                    entries.append((n, chosen[0].ip))
        return entries

    # -- running --------------------------------------------------------
    def _volumes(self, pod: Pod) -> dict[str, str]:
        """volume name -> a local directory holding what it would."""
        dirs = {}
        claims = set()
        if pod.kind == "StatefulSet":
            sts = self.find("StatefulSet", pod.owner)
            claims = {c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])}
        for c in claims:
            key = f"{pod.name}/{c}"
            if key not in self.volume_dirs:
                self.volume_dirs[key] = tempfile.mkdtemp(prefix=f"pvc-{c}-{pod.name}-", dir=self.workdir)
            dirs[c] = self.volume_dirs[key]
        for v in pod.spec.get("volumes", []):
            d = tempfile.mkdtemp(prefix=f"vol-{v['name']}-{pod.name}-", dir=self.workdir)
            if "configMap" in v or "secret" in v:
                if "configMap" in v:
                    source = v["configMap"]
                    data = self.find("ConfigMap", source["name"]).get("data", {})
                else:
                    source = v["secret"]
                    data = self.secret_data(source["secretName"])
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    assert it["key"] in data, f"pod {pod.name}: volume {v['name']} wants key {it['key']!r}, which is not in {sorted(data)}"
                    path = os.path.join(d, it["path"])
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write(data[it["key"]])
            elif "emptyDir" in v or "persistentVolumeClaim" in v or "hostPath" in v:
                pass
            else:
                raise AssertionError(f"pod {pod.name}: volume kind of {v} is not emulated here")
            dirs[v["name"]] = d
        for d in dirs.values():
            os.chmod(d, 0o777)
            for root, subdirs, files in os.walk(d):
                for x in subdirs:
                    os.chmod(os.path.join(root, x), 0o777)
                for x in files:
                    os.chmod(os.path.join(root, x), 0o644)
        return dirs

    def _env(self, pod: Pod) -> dict[str, str]:
        env = {}
        for e in pod.container.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "fieldRef" in vf:
                    path = vf["fieldRef"]["fieldPath"]
                    value = {
                        "metadata.name": pod.name,
                        "metadata.namespace": pod.namespace,
                        "status.podIP": pod.ip,
                        "status.hostIP": pod.ip,
                        "spec.nodeName": "node-0",
                    }.get(path)
                    if value is None:
                        m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
                        assert m, f"pod {pod.name}: fieldRef {path} is not emulated here"
                        value = pod.labels[m.group(1)]
                    env[e["name"]] = value
                elif "resourceFieldRef" in vf:
                    env[e["name"]] = "1"
                elif "configMapKeyRef" in vf:
                    r = vf["configMapKeyRef"]
                    env[e["name"]] = self.find("ConfigMap", r["name"])["data"][r["key"]]
                elif "secretKeyRef" in vf:
                    r = vf["secretKeyRef"]
                    env[e["name"]] = self.secret_data(r["name"])[r["key"]]
                else:
                    raise AssertionError(f"pod {pod.name}: env source {vf} is not emulated here")
        return env

    def start(self, pod: Pod):
        c = pod.container
        env = self._env(pod)
        argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
        assert argv, f"pod {pod.name}: no command (the image's default is not used by the chart)"
        pod.dirs = self._volumes(pod)
        mounts = [(pod.dirs[m["name"]], m["mountPath"], m.get("readOnly", False)) for m in c.get("volumeMounts", [])]
        pod.log_path = os.path.join(self.workdir, f"{pod.name}.log")
        if self.runtime == PODMAN:
            name = f"{self.ns}-{pod.name}-{self.octet}"
            # A container of this name can only be one this test left behind
            # in a run that was killed before its cleanup: remove it.
            subprocess.run([PODMAN, "rm", "-f", "-t", "0", name], capture_output=True)
            cmd = [PODMAN, "run", "-d", "--name", name, "--network", "host", "--hostname", pod.hostname]
            for host, ip in self.hosts():
                cmd += ["--add-host", f"{host}:{ip}"]
            for k, v in env.items():
                cmd += ["-e", f"{k}={v}"]
            for d, mp, ro in mounts:
                cmd += ["-v", f"{d}:{mp}" + (":ro" if ro else "")]
            sc = {**(pod.spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
            if "runAsUser" in sc:
                cmd += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
            if sc.get("readOnlyRootFilesystem"):
                cmd += ["--read-only"]
            image = c["image"]
            assert image == self.image, f"pod {pod.name} runs {image}, expected the built {self.image}"
            cmd += [image] + argv
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, f"podman run {pod.name}: {r.stderr}"
            pod.handle = f"{self.ns}-{pod.name}-{self.octet}"
        else:
            argv[0] = self.binaries[os.path.basename(argv[0])]
            # No /etc/hosts of its own: the Services' names in URLs become
            # their addresses (longest names first, so a pod's name is not
            # cut by its Service's).
            for host, ip in sorted(self.hosts(), key=lambda h: -len(h[0])):
                pattern = re.compile(r"(?<=//)" + re.escape(host) + r"(?![\w.-])")
                argv = [pattern.sub(ip, a) for a in argv]
                env = {k: pattern.sub(ip, v) for k, v in env.items()}
            # Mount paths become the local directories, in one pass (a local
            # directory may itself lie under a mount path such as /tmp).
            if mounts:
                by_path = {mp.rstrip("/"): d for d, mp, _ in mounts}
                alt = "|".join(re.escape(mp) for mp in sorted(by_path, key=len, reverse=True))
                pattern = re.compile(r"(?:(?<=^)|(?<=[=:,]))(" + alt + r")(?=/|$|[:,])")

                def local(text):
                    return pattern.sub(lambda m: by_path[m.group(1)], text)

                argv = [local(a) for a in argv]
                env = {k: local(v) for k, v in env.items()}
            full = dict(os.environ)
            full.update(env)
            log = open(pod.log_path, "w")
            pod.handle = subprocess.Popen(argv, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pods[pod.name] = pod
        return pod

    def logs(self, pod: Pod) -> str:
        if self.runtime == PODMAN:
            r = subprocess.run([PODMAN, "logs", pod.handle], capture_output=True, text=True)
            return r.stdout + r.stderr
        with open(pod.log_path) as f:
            return f.read()

    def running(self, pod: Pod) -> bool:
        if self.runtime == PODMAN:
            r = subprocess.run([PODMAN, "inspect", "-f", "{{.State.Running}}", pod.handle], capture_output=True, text=True)
            return r.stdout.strip() == "true"
        return pod.handle.poll() is None

    def exit_code(self, pod: Pod, timeout: float) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.running(pod):
                if self.runtime == PODMAN:
                    r = subprocess.run([PODMAN, "inspect", "-f", "{{.State.ExitCode}}", pod.handle], capture_output=True, text=True)
                    return int(r.stdout.strip())
                return pod.handle.returncode
            time.sleep(0.3)
        raise AssertionError(f"pod {pod.name} still runs after {timeout:.0f} s:\n{self.logs(pod)[-3000:]}")

    def probe_ready(self, pod: Pod) -> bool:
        """The rendered readinessProbe, once."""
        probe = pod.container.get("readinessProbe")
        assert probe, f"pod {pod.name} has no readinessProbe"
        tcp = probe.get("tcpSocket")
        if tcp:
            port = tcp["port"] if isinstance(tcp["port"], int) else pod.port(tcp["port"])
            try:
                with socket.create_connection((pod.ip, port), timeout=probe.get("timeoutSeconds", 1)):
                    return True
            except OSError:
                return False
        g = probe.get("grpc")
        assert g, f"pod {pod.name}: only gRPC and TCP probes are emulated ({probe})"
        with grpc.insecure_channel(f"{pod.ip}:{g['port']}") as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=g.get("service", "")), timeout=probe.get("timeoutSeconds", 1)
                )
                return r.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

    def wait_ready(self, pods, timeout=120):
        deadline = time.time() + timeout
        pending = list(pods)
        while pending and time.time() < deadline:
            for p in list(pending):
                assert self.running(p), f"pod {p.name} exited before it was ready:\n{self.logs(p)[-3000:]}"
                if self.probe_ready(p):
                    pending.remove(p)
            time.sleep(0.3)
        assert not pending, "not ready after %ds: %s" % (timeout, [(p.name, self.logs(p)[-1500:]) for p in pending])

    def signal(self, pod: Pod, sig=signal.SIGTERM):
        if self.runtime == PODMAN:
            subprocess.run([PODMAN, "kill", "--signal", sig.name, pod.handle], check=True, capture_output=True)
        else:
            pod.handle.send_signal(sig)

    def stop_all(self):
        for p in self.pods.values():
            if self.runtime == PODMAN:
                subprocess.run([PODMAN, "rm", "-f", "-t", "2", p.handle], capture_output=True)
            elif p.handle.poll() is None:
                os.killpg(p.handle.pid, signal.SIGKILL)
                p.handle.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class ClientTLS:
    """A client certificate for a mutual-TLS channel: PEM bytes of the CA,
    the certificate and its key, and the DNS name the server's certificate
    must carry (its role's: coordinator.llmos, worker.llmos), checked
    instead of the address dialled."""

    ca: bytes
    cert: bytes
    key: bytes
    server_name: str


def channel(address: str, tls: ClientTLS | None = None) -> grpc.Channel:
    """A plaintext channel, or a mutual-TLS one with `tls`."""
    if tls is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", tls.server_name)])


def grpc_unary(address: str, method: str, request: bytes = b"", timeout: float = 10,
               tls: ClientTLS | None = None) -> tuple[grpc.StatusCode, bytes | None]:
    """One unary call of `method` (`/package.Service/Method`) with a raw
    protobuf request (b"": every field at its default), no metadata (no
    API key): its status code and, when OK, the raw response. Needs no
    generated stubs, so it asks any port which services it serves
    (UNIMPLEMENTED: not this one). Plaintext, or mutual TLS with `tls`."""
    with channel(address, tls) as ch:
        call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            return grpc.StatusCode.OK, call(request, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), None


def podman_usable(image: str) -> str | None:
    """None when podman can run `image` here, else why not."""
    if shutil.which(PODMAN) is None:
        return "podman is not installed"
    r = subprocess.run([PODMAN, "image", "exists", image], capture_output=True)
    if r.returncode != 0:
        return f"image {image} is not built (scripts/image.sh)"
    r = subprocess.run([PODMAN, "run", "--rm", "--network", "host", image, "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"podman cannot run a container here: {r.stderr.strip()[-300:]}"
    return None
