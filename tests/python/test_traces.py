"""One request's trace across the cluster (issue 23): `llmos local` with
`LLMOS_OTLP_ENDPOINT` pointed at a collector in this test (an OTLP/HTTP
receiver decoding the protobuf bodies with the OpenTelemetry project's own
`opentelemetry-proto` classes). An HTTP request carrying a W3C
`traceparent` and an `x-request-id` produces, in that trace: the
coordinator's `generate` span (child of the caller's span, named by the
request id), its `attempt` on the replica, the first-stage worker's
`sequence` (child of the attempt), and `step` spans on both pipeline
stages (layers 0-15 and 15-30), children of the sequence."""

import http.server
import json
import threading
import time
import urllib.request

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from local_cluster import auth, local_cluster

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Collector:
    """Spans posted to /v1/traces, as (service, span) pairs."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with collector.lock:
                    for rs in req.resource_spans:
                        service = next((a.value.string_value for a in rs.resource.attributes
                                        if a.key == "service.name"), "")
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                collector.spans.append((service, s))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_trace(self, trace_hex):
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_hex]


def attrs(span):
    out = {}
    for a in span.attributes:
        out[a.key] = getattr(a.value, a.value.WhichOneof("value"))
    return out


@pytest.fixture(scope="module")
def traced():
    collector = Collector()
    env = {"LLMOS_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with local_cluster(env) as c:
        yield c, collector
    collector.server.shutdown()


def test_one_request_is_one_trace_over_coordinator_and_every_stage(traced):
    cluster, collector = traced
    body = json.dumps({"model": "smollm2", "prompt": "The quick brown fox", "max_tokens": 4,
                       "temperature": 0}).encode()
    req = urllib.request.Request(cluster["http"] + "/v1/completions", body, {
        "content-type": "application/json",
        **auth(),
        "traceparent": f"00-{TRACE}-{PARENT}-01",
        "x-request-id": "trace-me",
    })
    with urllib.request.urlopen(req, timeout=120) as r:
        usage = json.loads(r.read())["usage"]
    assert usage["completion_tokens"] == 4

    def shape():
        spans = collector.of_trace(TRACE)
        by_name = {}
        for svc, s in spans:
            by_name.setdefault(s.name, []).append((svc, s))
        return spans, by_name

    deadline = time.time() + 30
    while True:
        spans, by_name = shape()
        stages = {attrs(s).get("stage") for _, s in by_name.get("step", [])}
        if {"generate", "attempt", "sequence"} <= set(by_name) and {"0-15", "15-30"} <= stages:
            break
        assert time.time() < deadline, f"spans seen: {[(svc, s.name) for svc, s in spans]}"
        time.sleep(0.2)

    [(gsvc, generate)] = by_name["generate"]
    assert gsvc == "llmos-coordinator"
    assert generate.parent_span_id.hex() == PARENT
    assert attrs(generate)["request_id"] == "trace-me"
    [(asvc, attempt)] = by_name["attempt"]
    assert asvc == "llmos-coordinator" and attempt.parent_span_id == generate.span_id
    [(ssvc, sequence)] = by_name["sequence"]
    assert ssvc == "llmos-worker" and sequence.parent_span_id == attempt.span_id
    assert attrs(sequence)["request_id"] == "trace-me"
    steps = by_name["step"]
    assert all(svc == "llmos-worker" for svc, _ in steps)
    # Each stage ran the prompt step and three decode steps of this
    # request, each a child of its sequence (it ran alone).
    for stage in ("0-15", "15-30"):
        mine = [s for _, s in steps if attrs(s)["stage"] == stage]
        assert len(mine) == 4, (stage, len(mine))
        assert all(s.parent_span_id == sequence.span_id for s in mine), stage
        assert sum(attrs(s)["tokens"] for s in mine) == usage["prompt_tokens"] + 3, stage
    # Every span of the trace lies within the request's.
    for _, s in spans:
        if s.name != "generate":
            assert s.start_time_unix_nano >= generate.start_time_unix_nano
