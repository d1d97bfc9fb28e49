"""The OpenAI-compatible server over real HTTP on 127.0.0.1: the `openai` package as the client, streaming and not,
gives the runtime's single-request output (greedy; sampled for the same seed) and task=generate's; stop
strings cut the text at the first match; every malformed request is a 400 naming the field; a missing or
wrong API key is a 401 that touches no slot; a full queue is a 429; oversized bodies (413) and too-long
prompts (400) leave a concurrent request unharmed; a client that leaves mid-request frees its slot;
/metrics, /health and /v1/models answer; task=serve runs and stops on Ctrl-C."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import main
from serve.server import BackgroundServer, ServerConfig, create_app, parse_prometheus
from tests.conftest import ROOT
from tests.serve.conftest import SMALL, make_scheduler

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n", "x", "hello", "for i in range(10):",
           "SELECT * FROM", "0123456789"]
IDS = {"return_token_ids": True}  # vLLM's extension: the token ids too (random models emit many invalid UTF-8 bytes)


@pytest.fixture(scope="module")
def server(runtime, spec):
    scheduler = make_scheduler(runtime, spec)
    scheduler.start()
    app = create_app(runtime, scheduler, ServerConfig(runtime.plan.name, api_key=KEY, max_body_bytes=4096))
    with BackgroundServer(app) as srv:
        srv.scheduler = scheduler
        yield srv
    scheduler.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(alone, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    r = alone.generate(alone.tokenizer.encode(prompt).ids, max_tokens)
    return alone.tokenizer.decode(r.output_ids), r.output_ids


def wait_idle(scheduler, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = scheduler.stats()
        if s["running"] == 0 and s["queue_length"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"the scheduler did not drain: {scheduler.stats()}")


def test_openai_client_greedy_equals_single_request(server, client, alone):
    model = client.models.list().data[0].id
    assert model == alone.plan.name
    for i, prompt in enumerate(PROMPTS):
        n = 6 + 5 * i
        want, ids = reference(alone, prompt, n)
        r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body=IDS)
        [c] = r.choices
        assert c.text == want and c.model_extra["token_ids"] == ids, (prompt, c.text, want)
        assert r.usage.prompt_tokens == len(alone.tokenizer.encode(prompt).ids)
        assert r.usage.completion_tokens == len(ids)
        assert c.finish_reason == ("stop" if alone.eos_ids and ids[-1] in alone.eos_ids else "length")
        chunks = list(client.completions.create(model=model, prompt=[prompt], max_tokens=n, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, extra_body=IDS))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
        assert [t for ch in chunks if ch.choices for t in ch.choices[0].model_extra["token_ids"]] == ids
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
        assert chunks[-1].usage.completion_tokens == len(ids)
        r = client.completions.create(model=model, prompt=alone.tokenizer.encode(prompt).ids, max_tokens=n,
                                      extra_body=IDS)  # token ids as the prompt
        assert r.choices[0].text == want and r.choices[0].model_extra["token_ids"] == ids


def test_sampled_equals_single_request_for_the_same_seed(server, client, alone):
    from runtime.sampling import SamplingParams
    differs = 0
    for i, prompt in enumerate(PROMPTS[:4]):
        t, k, p, seed = (0.7, 1.0, 1.3, 1.0)[i], (0, 8, 0, 3)[i], (1.0, 1.0, 0.9, 0.8)[i], 100 + i
        req = alone.request(alone.tokenizer.encode(prompt).ids, 20, seed)
        req.sampling = SamplingParams(t, k, p, alone.sampling.acceptance)
        want = alone.engine().generate([req])[0].output_ids
        for stream in (False, True):
            r = client.completions.create(model=alone.plan.name, prompt=prompt, max_tokens=20, temperature=t,
                                          top_p=p, seed=seed, stream=stream, extra_body={"top_k": k, **IDS})
            got = ([x for c in r for x in c.choices[0].model_extra["token_ids"]] if stream
                   else r.choices[0].model_extra["token_ids"])
            assert got == want, (prompt, stream)
        other = client.completions.create(model=alone.plan.name, prompt=prompt, max_tokens=20, temperature=t, top_p=p,
                                          seed=seed + 1, extra_body={"top_k": k, **IDS})
        differs += other.choices[0].model_extra["token_ids"] != want
    assert differs  # the seed matters: these really are sampled


def test_greedy_equals_task_generate(server, client, tmp_path, capsys):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
    args = [a for a in SMALL if not a.startswith("task=")] + [
        "target=tiny_random", "drafter=noisy_copy", "tree=chain", "task=generate", f"prompts={prompts}",
        "task.max_new_tokens=12", f"hydra.run.dir={tmp_path / 'run'}"]
    assert main.cli(args) == 0, capsys.readouterr().err
    [answers] = (tmp_path / "run").glob("answers-*.jsonl")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    model = client.models.list().data[0].id
    for row, prompt in zip(rows, PROMPTS):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12)
        assert r.choices[0].text == row["choices"][0]["turns"][0]


def test_stop_strings(server, client, alone):
    model = alone.plan.name
    tok = alone.tokenizer
    tested = 0
    for prompt in PROMPTS:
        want, ids = reference(alone, prompt, 24)
        # a two-character stop string starting at the first valid character that is new at its position, and one
        # at the very start (random models repeat themselves: cut there, nothing is returned)
        i = next((i for i in range(1, len(want) - 1) if want[i] != "\ufffd" and want[i] not in want[:i]), None)
        for stop in ([want[i:i + 2]] if i is not None else []) + ([want[:2]] if "\ufffd" not in want[:2] else []):
            cut = want.index(stop)
            need = next(m for m in range(len(ids) + 1) if stop in tok.decode(ids[:m]))  # tokens up to the match
            r = client.completions.create(model=model, prompt=prompt, max_tokens=24, stop=["\x00never", stop],
                                          extra_body=IDS)
            assert (r.choices[0].text, r.choices[0].finish_reason) == (want[:cut], "stop"), (prompt, stop)
            assert r.usage.completion_tokens == need and r.choices[0].model_extra["token_ids"] == ids[:need]
            chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=24, stop=stop, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == want[:cut]
            assert chunks[-1].choices[0].finish_reason == "stop"
            tested += 1
    assert tested >= 3
    wait_idle(server.scheduler)  # the stopped jobs were cancelled: their rows are free


MALFORMED = [  # (body, the field the error must name)
    ({}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 300]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [[1, 2]]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "top_k": 1.5}, "top_k"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "stop": 5}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ["s"] * 17}, "stop"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "logprobs": 2}, "logprobs"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "max_token": 5}, "max_token"),
    ({"prompt": "a", "model": "gpt-4"}, "model"),
]


def test_malformed_requests_get_400_naming_the_field(server):
    before = server.scheduler.stats()["requests_total"]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as h:
        for body, field in MALFORMED:
            r = h.post("/v1/completions", json=body)
            assert r.status_code == (404 if field == "model" else 400), (body, r.text)
            err = r.json()["error"]
            assert err["param"] == field and field in err["message"], (body, err)
        for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
            r = h.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "error" in r.json(), (raw, r.text)
        assert server.scheduler.stats()["requests_total"] == before  # nothing reached the scheduler
        r = h.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 3})  # still serving
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        r = h.post("/v1/completions", json={"prompt": "def f(x):"})  # max_tokens: the server's default (16)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16


def test_api_key(server):
    before = server.scheduler.stats()["requests_total"]
    body = {"prompt": "hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt="hello", max_tokens=2)
    assert server.scheduler.stats()["requests_total"] == before  # touched no slot
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH).status_code == 200


def test_oversized_and_too_long_refused_without_harming_others(server, client, alone):
    want, _ = reference(alone, PROMPTS[0], 40)
    got = {}

    def long_request():
        got["text"] = "".join(c.choices[0].text for c in client.completions.create(
            model=alone.plan.name, prompt=PROMPTS[0], max_tokens=40, stream=True))

    t = threading.Thread(target=long_request)
    t.start()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as h:
        big = json.dumps({"prompt": "a" * 5000, "max_tokens": 2})
        r = h.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunked():
            for _ in range(5):
                yield b" " * 1000
        r = h.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413  # no Content-Length: counted while reading
        r = h.post("/v1/completions", json={"prompt": "ab" * 60, "max_tokens": 2})  # 120 tokens > 96
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "context" in r.json()["error"]["message"]
    t.join(timeout=60)
    assert got["text"] == want


def test_full_queue_is_429(runtime, spec, alone):
    sched = make_scheduler(runtime, spec, max_batch_size=1, max_queue=1)  # own rows; not started: requests wait
    with BackgroundServer(create_app(runtime, sched, ServerConfig(runtime.plan.name))) as srv:
        body = {"prompt": PROMPTS[2], "max_tokens": 5, **IDS}
        got = {}
        t = threading.Thread(target=lambda: got.update(r=httpx.post(f"{srv.url}/v1/completions", json=body,
                                                                        timeout=60)))
        t.start()
        deadline = time.monotonic() + 20
        while sched.stats()["queue_length"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
        assert parse_prometheus(httpx.get(f"{srv.url}/metrics").text)["spec_rejected_total"] == 1
        sched.start()  # the waiting request is served as if nothing happened
        t.join(timeout=60)
        assert got["r"].status_code == 200
        assert got["r"].json()["choices"][0]["token_ids"] == reference(alone, PROMPTS[2], 5)[1]
    sched.stop()


def test_disconnect_mid_stream_frees_the_slot(server, alone):
    s0 = wait_idle(server.scheduler)
    body = {"prompt": "x", "max_tokens": 90, "stream": True, **IDS}  # a chunk per step; 90 of the 95 left
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert server.scheduler.stats()["running"] == 1
        # the response is closed before its 90 tokens: the job is cancelled and its row freed
    s = wait_idle(server.scheduler)
    cancelled = s["finished_by_reason"].get("cancelled", 0) - s0["finished_by_reason"].get("cancelled", 0)
    assert cancelled == 1
    assert s["tokens_total"] - s0["tokens_total"] < 90
    # not streamed: the client closes the connection while its job runs
    raw = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
        deadline = time.monotonic() + 20
        while server.scheduler.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
    s2 = wait_idle(server.scheduler)
    assert s2["finished_by_reason"].get("cancelled", 0) - s["finished_by_reason"].get("cancelled", 0) == 1
    assert s2["tokens_total"] - s["tokens_total"] < 90
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 5, **IDS}, headers=AUTH)
    assert r.json()["choices"][0]["token_ids"] == reference(alone, PROMPTS[1], 5)[1]


def test_metrics_health_models(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "abc", "max_tokens": 4}, headers=AUTH)
    text = httpx.get(f"{server.url}/metrics").text
    m = parse_prometheus(text)
    for name in ("spec_tokens_generated_total", "spec_tau", "spec_goodput_tokens_per_second", "spec_queue_length",
                 "spec_running_requests", "spec_step_time_seconds", "spec_completion_tokens_total"):
        assert name in m, name
    assert any(k.startswith("spec_requests_total{finish_reason=") for k in m)
    assert any(k.startswith('spec_acceptance_rate{position="0"}') for k in m)
    assert m['spec_http_responses_total{code="200"}'] >= 1
    assert re.search(r"^# TYPE spec_tau gauge$", text, re.M)
    data = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]
    assert [d["id"] for d in data] == [server.scheduler.rt.plan.name]
    assert m['spec_scheduler_policy_info{policy="fixed"}'] == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_task_serve_runs_and_stops_on_a_signal(tmp_path, sig):
    """Ctrl-C and a process manager's SIGTERM both stop the server gracefully: exit 0 and the result written."""
    cmd = [sys.executable, "main.py", "target=tiny_random", "drafter=noisy_copy", "tree=chain", *SMALL,
           "task.port=0", f"hydra.run.dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**__import__("os").environ, "SPEC_API_KEY": "env-key"})
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            url = m and m.group(1)
        assert url, "the server did not report its address"
        for _ in range(100):  # uvicorn may still be starting up
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer env-key"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        p.send_signal(sig)
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "result.json").read_text())["task"] == "serve"
