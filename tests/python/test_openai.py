"""The OpenAI-compatible HTTP API, with the official `openai` package as a
black-box client (issue 23), against `llmos local` (a coordinator and two
workers, SmolLM2 split over both).

Checked: chat and completions, streaming with include_usage (the usage chunk
with no choices, then [DONE] as the SDK reads it), stop as a string and a
list, seed reproducibility at temperature > 0, max_completion_tokens,
logprobs, the error classes (NotFoundError, BadRequestError with
context_length_exceeded, a refused unsupported field naming it), and greedy
text through HTTP equal to the gRPC API's (the llmos CLI) for the same
request.
"""

import json
import os
import subprocess
import urllib.request

import openai
import pytest

from local_cluster import LLMOS, local_cluster

MODEL = "smollm2"


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster["http"] + "/v1", api_key="unused", max_retries=0)


def grpc_text(cluster, prompt, max_tokens, raw):
    """The same greedy request through the gRPC API (the llmos CLI)."""
    args = [LLMOS, "--coordinator", cluster["grpc"], "generate", "--model", MODEL,
            "--prompt", prompt, "--max-tokens", str(max_tokens), "--json"]
    if raw:
        args.append("--raw")
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    lines = [json.loads(l) for l in out.splitlines()]
    return "".join(l.get("text", "") for l in lines[:-1]), lines[-1]


def test_models_lists_the_deployed_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_greedy_equals_grpc(client, cluster):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24,
    )
    text, last = grpc_text(cluster, "What is the capital of France?", 24, raw=False)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == last["usage"]["completion_tokens"]
    assert r.usage.prompt_tokens == last["usage"]["prompt_tokens"]
    assert r.object == "chat.completion"


def test_completions_greedy_equals_grpc_and_max_tokens_gives_length(client, cluster):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=12)
    text, _ = grpc_text(cluster, "The quick brown fox", 12, raw=True)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.object == "text_completion"


def test_streaming_chat_with_usage_then_done(client, cluster):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_completion_tokens=24, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected, _ = grpc_text(cluster, "What is the capital of France?", 24, raw=False)
    assert text == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_ends_with_done(cluster):
    body = json.dumps({"model": MODEL, "prompt": "One, two,", "max_tokens": 4, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(cluster["http"] + "/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [l for l in resp.read().decode().splitlines() if l.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_as_string_and_list(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=16).choices[0].text
    assert " 6" in base, base
    one = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=16, stop=" 6")
    assert one.choices[0].text == base[: base.index(" 6")] and one.choices[0].finish_reason == "stop"
    many = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=16, stop=["zzz", " 7", " 6"])
    assert many.choices[0].text == one.choices[0].text


def test_seed_reproduces_at_temperature(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0.9, max_tokens=24)
    a = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    b = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    c = client.chat.completions.create(seed=8, **ask).choices[0].message.content
    assert a == b
    assert a != c


def test_logprobs_of_greedy_tokens(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=8, logprobs=True,
    )
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens
    assert all(l.logprob <= 0 for l in lps)
    assert "".join(l.token for l in lps) == r.choices[0].message.content


def test_errors_have_the_openai_classes(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    assert e.value.code == "context_length_exceeded", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate"


def test_health_live_and_body_limit(cluster):
    for path in ("/health", "/live"):
        with urllib.request.urlopen(cluster["http"] + path, timeout=10) as r:
            assert r.status == 200
    body = json.dumps({"model": MODEL, "prompt": "x" * (9 << 20)}).encode()
    req = urllib.request.Request(cluster["http"] + "/v1/completions", body, {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413
    assert json.loads(e.value.read())["error"]["code"] == "request_too_large"


def test_a_full_queue_is_429_with_retry_after_and_the_sdk_retry_succeeds(cluster):
    """A second deployment admitting one running and one waiting request:
    with both taken, the next request gets 429 (RateLimitError) with
    Retry-After; the SDK's own retry then succeeds once they finish."""
    import threading

    deploy = subprocess.run(
        [LLMOS, "--coordinator", cluster["grpc"], "deploy", "--name", "narrow", "--source", "smollm2",
         "--stages", "1", "--max-running", "1", "--max-waiting", "1", "--timeout", "120"],
        capture_output=True, text=True, timeout=180,
    )
    assert deploy.returncode == 0, deploy.stderr
    statuses = []
    hooks = {"response": [lambda r: statuses.append(r.status_code)]}
    no_retry = openai.OpenAI(base_url=cluster["http"] + "/v1", api_key="-", max_retries=0)
    retrying = openai.OpenAI(base_url=cluster["http"] + "/v1", api_key="-", max_retries=8,
                             http_client=openai.DefaultHttpxClient(event_hooks=hooks))
    long = dict(model="narrow", prompt="Once upon a time", temperature=0, max_tokens=60)
    blockers = []

    def block():
        stream = no_retry.completions.create(stream=True, **long)
        blockers.append("".join(c.choices[0].text for c in stream if c.choices))

    def engine():
        out = subprocess.run([LLMOS, "--coordinator", cluster["grpc"], "status"], capture_output=True, text=True, timeout=30)
        m = next(m for m in json.loads(out.stdout)["models"] if m["name"] == "narrow")
        return m["serving"] or {}

    threads = [threading.Thread(target=block) for _ in range(2)]
    for t in threads:
        t.start()
    import time

    deadline = time.time() + 30
    while not (engine().get("running") == 1 and engine().get("waiting") == 1):
        assert time.time() < deadline, f"the two requests did not fill the queue: {engine()}"
        time.sleep(0.05)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            no_retry.completions.create(**long)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.code == "rate_limit_exceeded"
        r = retrying.completions.create(**long)
        assert 429 in statuses and statuses[-1] == 200, statuses
        assert r.choices[0].text
    finally:
        for t in threads:
            t.join(timeout=120)
        subprocess.run([LLMOS, "--coordinator", cluster["grpc"], "undeploy", "narrow"], capture_output=True, timeout=120)
    assert len(blockers) == 2 and blockers[0] == blockers[1] == r.choices[0].text
