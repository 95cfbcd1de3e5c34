"""`/metrics` read with Prometheus' own text parser (prometheus_client):
counters and histograms move by exactly what known requests did, under the
native names and, with `--metrics-compat vllm`, under vLLM's, on the
coordinator; and per pipeline stage on each worker's `--metrics-listen`
(issue 23)."""

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from local_cluster import auth, local_cluster


@pytest.fixture(scope="module")
def cluster():
    with local_cluster({"LLMOS_METRICS_COMPAT": "vllm"}) as c:
        yield c


@pytest.fixture(scope="module")
def http(cluster):
    return cluster["http"]


def scrape(http, path="/metrics"):
    with urllib.request.urlopen(http + path, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def complete(http, ids, max_tokens):
    body = json.dumps({"model": "smollm2", "prompt": ids, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(http + "/v1/completions", body, {"content-type": "application/json", **auth()})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_counters_and_histograms_move_by_what_the_requests_did(cluster, http):
    workers = cluster["worker_metrics"]
    assert len(workers) == 2, cluster
    before = scrape(http)
    wbefore = [scrape(w, "") for w in workers]
    for i in range(3):
        r = complete(http, [1000 + 50 * i + j for j in range(40)], 5)
        assert r["usage"] == {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45,
                              "prompt_tokens_details": {"cached_tokens": r["usage"]["prompt_tokens_details"]["cached_tokens"]}}
    after = scrape(http)
    wafter = [scrape(w, "") for w in workers]

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for scheme, m, reason in (("llmos", {"model": "smollm2"}, "reason"), ("vllm:", {"model_name": "smollm2"}, "finished_reason")):
        pre = "llmos_" if scheme == "llmos" else "vllm:"
        assert delta(pre + "generation_tokens_total", **m) == 15, scheme
        assert delta(pre + "prompt_tokens_total", **m) == 120, scheme
        finished = pre + ("requests_finished_total" if scheme == "llmos" else "request_success_total")
        assert delta(finished, **m, **{reason: "length"}) == 3, scheme
        assert delta(pre + "time_to_first_token_seconds_count", **m) == 3, scheme
        assert delta(pre + "e2e_request_latency_seconds_count", **m) == 3, scheme
        assert delta(pre + "request_queue_time_seconds_count", **m) == 3, scheme
        # 5 tokens: 4 gaps each.
        assert delta(pre + "inter_token_latency_seconds_count", **m) == 12, scheme
        assert delta(pre + "time_to_first_token_seconds_sum", **m) > 0, scheme
        # Every observation falls in the +Inf bucket.
        assert value(after, pre + "time_to_first_token_seconds_bucket", **m, le="+Inf") == value(after, pre + "time_to_first_token_seconds_count", **m)
    # What the engines report, and the control plane.
    # Engine families carry the worker pool too ("" for llmos local's).
    assert value(after, "llmos_kv_blocks_total", model="smollm2", pool="") > 0
    assert ("llmos_requests_running", (("model", "smollm2"), ("pool", ""))) in after
    assert value(after, "llmos_requests_running", model="smollm2", pool="") == 0
    assert 0 <= value(after, "vllm:kv_cache_usage_perc", model_name="smollm2") <= 1
    assert ("vllm:num_requests_waiting", (("model_name", "smollm2"),)) in after
    # 40-token prompts: their full 16-token blocks are looked up.
    assert value(after, "llmos_prefix_cache_queries_total", model="smollm2", pool="") > value(before, "llmos_prefix_cache_queries_total", model="smollm2", pool="")
    # One stage, nothing replaced: nothing recomputed from kept hidden states.
    assert value(after, "llmos_kv_repaired_tokens_total", model="smollm2", pool="") == 0
    assert value(after, "llmos_raft_term") >= 1 and value(after, "llmos_raft_is_leader") == 1
    assert value(after, "llmos_requests_in_flight", model="smollm2") == 0
    # One coordinator, elected once; nothing it proposed failed.
    assert value(after, "llmos_raft_leader_changes_total") == 1
    assert ("llmos_raft_proposals_failed_total", ()) in after
    assert value(after, "llmos_raft_proposals_failed_total") == 0

    # Per stage, on each worker: llmos local splits SmolLM2's 30 layers
    # 0-15 and 15-30. Each stage ran every token of the three requests
    # (40 prompt tokens, then 4 one-token decode steps) in its steps.
    stages = {}
    for b, a in zip(wbefore, wafter):
        for (name, labels) in a:
            if name == "llmos_stage_step_tokens_total":
                l = dict(labels)
                stages[l["stage"]] = (b, a, l)
    assert sorted(stages) == ["0-15", "15-30"], stages.keys()
    for stage, (b, a, l) in stages.items():
        d = lambda name: value(a, name, **l) - value(b, name, **l)
        assert d("llmos_stage_step_tokens_total") == 3 * (40 + 4), stage
        assert d("llmos_stage_step_seconds_count") >= 3 * 5, stage
        assert d("llmos_stage_step_seconds_sum") > 0, stage
        assert value(a, "llmos_stage_weight_bytes", **l) > 0
        assert value(a, "llmos_stage_kv_cache_bytes", **l) > 0
        assert value(a, "llmos_worker_shards") == 1
        assert value(a, "llmos_worker_memory_total_bytes") >= value(a, "llmos_worker_memory_available_bytes") > 0
    # The engine runs on the first stage's worker.
    first = stages["0-15"][1]
    assert value(first, "llmos_engine_kv_blocks_total", model="smollm2") == value(after, "llmos_kv_blocks_total", model="smollm2", pool="")
