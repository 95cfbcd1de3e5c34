"""The OpenAI-compatible HTTP API, with the official `openai` package as a
black-box client (issue 23), against `llmos local` (a coordinator and two
workers, SmolLM2 split over both).

Checked: chat and completions, streaming with include_usage (the usage chunk
with no choices, then [DONE] as the SDK reads it), stop as a string and a
list, seed reproducibility at temperature > 0, max_completion_tokens, n > 1
and several prompts, logprobs and top_logprobs equal to gRPC's, penalties
and logit_bias, the error classes (NotFoundError, BadRequestError with
context_length_exceeded, a bad or unknown field naming it), and greedy
text through HTTP equal to the gRPC API's (the llmos CLI) for the same
request. test_response_bodies_validate checks chat, completions and
streamed chunk bodies against the SDK's own models (generated from
OpenAI's OpenAPI specification) with pydantic's validation; the other tests
read the SDK's (unchecked) objects.
"""

import json
import os
import subprocess
import urllib.request

import openai
import pytest

from local_cluster import LLMOS, auth, local_cluster

MODEL = "smollm2"


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster["http"] + "/v1", api_key=cluster["key"], max_retries=0)


def grpc_tokens(cluster, prompt, max_tokens, raw, extra=()):
    """The same greedy request through the gRPC API (the llmos CLI): its
    token lines and its last line."""
    args = [LLMOS, "--coordinator", cluster["grpc"], "generate", "--model", MODEL,
            "--prompt", prompt, "--max-tokens", str(max_tokens), "--json", *extra]
    if raw:
        args.append("--raw")
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    lines = [json.loads(l) for l in out.splitlines()]
    return lines[:-1], lines[-1]


def grpc_text(cluster, prompt, max_tokens, raw):
    tokens, last = grpc_tokens(cluster, prompt, max_tokens, raw)
    return "".join(l.get("text", "") for l in tokens), last


def validated(raw, model):
    """The raw response's JSON, validated by the SDK's model of it."""
    body = raw.http_response.json()
    model.model_validate(body, strict=False)
    return body


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
    req = urllib.request.Request(cluster["http"] + "/v1/completions", body, {"content-type": "application/json", **auth()})
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
    for bad, param in [({"presence_penalty": 2.5}, "presence_penalty"), ({"n": 17}, "n"),
                       ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                       ({"logit_bias": {"99999999": 1}}, "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **bad)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", suffix="there")
    assert e.value.body["param"] == "suffix" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate"


def test_a_missing_or_wrong_key_is_an_authentication_error(cluster):
    """The official client's own classes: 401 is AuthenticationError."""
    for key in ["", "llmos_0123456789abcdef_" + "0" * 64, "not-a-key"]:
        c = openai.OpenAI(base_url=cluster["http"] + "/v1", api_key=key or "x", max_retries=0,
                          default_headers={} if key else {"authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401
        assert "key" in e.value.body["message"], e.value.body
    # Probes stay open.
    with urllib.request.urlopen(cluster["http"] + "/live", timeout=10) as r:
        assert r.status == 200


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def raw_client(client):
    return client.with_raw_response


def test_response_bodies_validate(raw_client):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = validated(raw_client.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0.7, seed=3, max_tokens=8, n=2,
        logprobs=True, top_logprobs=2), ChatCompletion)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    body = validated(raw_client.completions.create(
        model=MODEL, prompt=["One,", "Two,"], temperature=0, max_tokens=4, logprobs=1), Completion)
    assert len(body["choices"]) == 2
    raw = raw_client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=4,
                                             stream=True, stream_options={"include_usage": True}, logprobs=True)
    n = 0
    for line in raw.http_response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            ChatCompletionChunk.model_validate(json.loads(line[6:]))
            n += 1
    assert n >= 4


def test_n_choices(client):
    """n > 1: choice j draws with seed + j, so each equals a single request
    with that seed; prompt tokens count once; greedy choices agree."""
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0.9, max_tokens=16)
    r = client.chat.completions.create(n=3, seed=40, **ask)
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(seed=40 + j, **ask) for j in range(3)]
    for j, c in enumerate(r.choices):
        assert c.message.content == alone[j].choices[0].message.content, j
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    greedy = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=8, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    # Streamed: every choice's chunks carry its index, each ends once.
    chunks = list(client.chat.completions.create(n=2, seed=40, stream=True, **ask))
    texts = {0: "", 1: ""}
    ends = []
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                ends.append(c.index)
    assert sorted(ends) == [0, 1]
    assert texts[0] == r.choices[0].message.content and texts[1] == r.choices[1].message.content


def test_several_prompts_and_echo(client):
    r = client.completions.create(model=MODEL, prompt=["1, 2, 3,", "a, b, c,"], temperature=0, max_tokens=6, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    one = client.completions.create(model=MODEL, prompt="1, 2, 3,", temperature=0, max_tokens=6).choices[0].text
    two = client.completions.create(model=MODEL, prompt="a, b, c,", temperature=0, max_tokens=6).choices[0].text
    assert [c.text for c in r.choices] == [one, one, two, two]
    e = client.completions.create(model=MODEL, prompt="1, 2, 3,", temperature=0, max_tokens=6, echo=True)
    assert e.choices[0].text == "1, 2, 3," + one


def test_logprobs_and_top_logprobs_equal_grpcs(client, cluster):
    r = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    tokens, _ = grpc_tokens(cluster, CAPITAL[0]["content"], 8, raw=False, extra=["--top-logprobs", "3"])
    lps = r.choices[0].logprobs.content
    assert len(lps) == len(tokens) == 8
    for l, g in zip(lps, tokens):
        assert l.token == g["text"]
        assert abs(l.logprob - g["logprob"]) < 1e-6
        assert [round(a.logprob, 6) for a in l.top_logprobs] == [round(a["logprob"], 6) for a in g["top_logprobs"]]
        # Greedy: the chosen token is the most likely one.
        assert abs(l.top_logprobs[0].logprob - l.logprob) < 1e-6
        assert l.top_logprobs[0].logprob >= l.top_logprobs[1].logprob >= l.top_logprobs[2].logprob
    c = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=5, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_logit_bias_and_penalties_steer_greedy_decoding(client, cluster):
    """Banning the greedy first token (bias -100) gives the model's second
    choice (gRPC's top_logprobs[1]); frequency and presence penalties count
    generated tokens only, so the first token is unchanged while the
    continuation changes; repetition counts the prompt too."""
    prompt = "1, 1, 1, 1, 1, 1, 1, 1,"
    tokens, _ = grpc_tokens(cluster, prompt, 1, raw=True, extra=["--top-logprobs", "2"])
    first, second = tokens[0]["top_logprobs"][0], tokens[0]["top_logprobs"][1]
    ask = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    base = client.completions.create(**ask).choices[0].text
    assert base.startswith(first["text"])
    banned = client.completions.create(logit_bias={str(first["id"]): -100}, **ask).choices[0].text
    assert banned.startswith(second["text"]), (banned, second)
    freq = client.completions.create(frequency_penalty=2.0, **ask).choices[0].text
    assert freq.startswith(first["text"]) and freq != base, (freq, base)
    # Presence subtracts a constant once a token appeared: too little to
    # break "1, 1, 1"'s repetition, enough to change free text.
    story = dict(model=MODEL, prompt="Once upon a time, in a small village,", temperature=0, max_tokens=32)
    plain = client.completions.create(**story).choices[0].text
    pres = client.completions.create(presence_penalty=2.0, **story).choices[0].text
    assert pres != plain, pres
    lead = grpc_tokens(cluster, story["prompt"], 1, raw=True)[0][0]["text"]
    assert plain.startswith(lead) and pres.startswith(lead), (plain, pres, lead)
    rep = client.completions.create(extra_body={"repetition_penalty": 3.0}, **ask).choices[0].text
    assert rep != base, rep


def test_health_live_and_body_limit(cluster):
    for path in ("/health", "/live"):
        with urllib.request.urlopen(cluster["http"] + path, timeout=10) as r:
            assert r.status == 200
    body = json.dumps({"model": MODEL, "prompt": "x" * (9 << 20)}).encode()
    req = urllib.request.Request(cluster["http"] + "/v1/completions", body, {"content-type": "application/json", **auth()})
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
    no_retry = openai.OpenAI(base_url=cluster["http"] + "/v1", api_key=cluster["key"], max_retries=0)
    retrying = openai.OpenAI(base_url=cluster["http"] + "/v1", api_key=cluster["key"], max_retries=8,
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
