"""gRPC server reflection as the official Python client sees it (issue 23).

grpcio-reflection speaks only reflection v1alpha; a coordinator and a worker
must answer it (they also serve v1) with every llmos service and the
descriptors a dynamic client needs to build a request.
"""

import os
import re
import subprocess

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/llmos/target"))


def start(binary, *args):
    """Starts a release binary on 127.0.0.1:0; returns (process, address)."""
    p = subprocess.Popen(
        [os.path.join(TARGET, "release", binary), *args, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = p.stdout.readline()
    m = re.match(r"listening on (\S+)", line)
    assert m, f"{binary} printed {line!r} instead of its address"
    return p, m.group(1)


def reflect(address):
    """(channel, advertised service names, a descriptor pool fed by reflection)."""
    ch = grpc.insecure_channel(address)
    db = ProtoReflectionDescriptorDatabase(ch)
    return ch, set(db.get_services()), DescriptorPool(db)


def test_a_coordinator_and_a_worker_answer_reflection_v1alpha():
    # Both planes on one port (reflection lists them all): no API keys.
    coordinator, c_addr = start("llmos-coordinator", "--no-auth", "--insecure")
    worker, w_addr = start("llmos-worker", "serve", "--insecure")
    try:
        ch, names, pool = reflect(c_addr)
        assert names == {
            "llmos.v1.Inference",
            "llmos.v1.Admin",
            "llmos.worker.v1.Registry",
            "llmos.coordinator.v1.Peer",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }, f"coordinator {c_addr} advertises {sorted(names)}"
        # The descriptors resolve: a dynamic client can build a Generate request.
        generate = pool.FindMethodByName("llmos.v1.Inference.Generate")
        assert generate.input_type.full_name == "llmos.v1.GenerateRequest"
        assert {f.name for f in generate.input_type.oneofs_by_name["prompt"].fields} == {"text", "token_ids", "chat"}

        ch.close()

        ch, names, pool = reflect(w_addr)
        assert names == {
            "llmos.worker.v1.Worker",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }, f"worker {w_addr} advertises {sorted(names)}"
        assert set(pool.FindServiceByName("llmos.worker.v1.Worker").methods_by_name) >= {"LoadShard", "Step"}
        health = pool.FindMethodByName("grpc.health.v1.Health.Check")
        assert health.output_type.full_name == "grpc.health.v1.HealthCheckResponse"
        ch.close()
    finally:
        for p in (coordinator, worker):
            p.kill()
            p.wait()
