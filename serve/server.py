"""The OpenAI-compatible HTTP server (`task=serve`): FastAPI routes over `serve.scheduler.Scheduler`.

    POST /v1/completions   prompt, max_tokens, temperature, top_p, top_k, seed, stop, stream (SSE), n=1
    GET  /v1/models        the one served model
    GET  /health           200 while the scheduler thread runs
    GET  /metrics          Prometheus text exposition of `Scheduler.stats()` plus the server's own counters

Every request is parsed by hand (`read_body` -> `CompletionRequest`) so a mistake gets OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` naming the field: 400 malformed, 401 missing or wrong
bearer token (checked before the body is read, so it touches no slot), 404 unknown model, 413 body over
`task.max_body_bytes`, 429 full queue. The scheduler calls `Job.on_event` from its own thread; the
handlers get the tokens through an asyncio queue, detokenize them incrementally (`TextStream`, which
also finds stop strings and cancels the job at the first match) and return one response or a stream of
`data: {chunk}` events ending in `data: [DONE]`. A client that goes away mid-request has its job
cancelled, which frees its cache row before the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from runtime.load import Runtime
from runtime.sampling import SamplingParams
from serve.scheduler import Job, QueueFull, Scheduler
from spec_compiler.errors import InputError

API_KEY_ENV = "SPEC_API_KEY"
"""Environment variable read for the API key when `task.api_key` is unset (as vLLM's --api-key / VLLM_API_KEY)."""
MAX_STOP = 16
"""Most stop strings per request."""
FINISH = {"eos": "stop", "max_new_tokens": "length", "context": "length"}
"""Scheduler finish reason -> OpenAI finish_reason (a stop string is "stop"; a job cancelled by the server
itself, e.g. at shutdown, is "abort", as in vLLM)."""


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, type: str = "invalid_request_error",
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """The /v1/completions body. Omitted sampling fields take the server's `sampling` config."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]
    """A string, a list of one string, or token ids."""
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    """None: the server's task.max_new_tokens (16 in conf/task/serve.yaml, OpenAI's default); generation also
    stops at EOS and at the context limit (finish_reason "length")."""
    temperature: Optional[Union[StrictFloat, StrictInt]] = Field(None, ge=0)
    top_p: Optional[Union[StrictFloat, StrictInt]] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    """0 or -1 (vLLM's spelling): off."""
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2 ** 62)
    """Same seed + same request = same completion; None: a random seed."""
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = 1
    user: Optional[StrictStr] = None
    return_token_ids: StrictBool = False
    """vLLM's extension: the response also carries `prompt_token_ids` and each choice's (each chunk's) `token_ids`."""
    # OpenAI fields accepted only at their neutral values (clients such as LangChain send them)
    echo: Optional[StrictBool] = None
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None
    presence_penalty: Optional[Union[StrictFloat, StrictInt]] = None
    frequency_penalty: Optional[Union[StrictFloat, StrictInt]] = None
    logit_bias: Optional[dict[str, Union[StrictFloat, StrictInt]]] = None

    def checked(self) -> "CompletionRequest":
        """Rules pydantic's field types do not express; raises ApiError(400) naming the field."""
        if self.n != 1:
            raise ApiError(400, f"n: only n=1 is supported (got {self.n}); send one request per completion", "n")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ApiError(400, "prompt: an empty list", "prompt")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ApiError(400, f"prompt: a list must hold exactly one string (got {len(self.prompt)}); send one "
                           "request per prompt", "prompt")
        stops = self.stop_list
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"stop: at most {MAX_STOP} stop strings (got {len(stops)})", "stop")
        if any(s == "" for s in stops):
            raise ApiError(400, "stop: a stop string must not be empty", "stop")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ApiError(400, f"{name}: must be a finite number", name)
        neutral = {"echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
                   "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})}
        for name, ok in neutral.items():
            if getattr(self, name) not in ok:
                raise ApiError(400, f"{name}: not supported by this server (only {ok[-1]!r})", name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed with stream=true", "stream_options")
        return self

    def prompt_ids(self, tokenizer, vocab_size: int) -> list[int]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], str):
            return tokenizer.encode(self.prompt if isinstance(self.prompt, str) else self.prompt[0]).ids
        bad = next((t for t in self.prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is not in the vocabulary [0, {vocab_size})", "prompt")
        return list(self.prompt)

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


def parse_completion(body: bytes) -> CompletionRequest:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(obj).__name__}")
    try:
        return CompletionRequest.model_validate(obj).checked()
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        msg = err["msg"] if err["type"] != "extra_forbidden" else "unknown field (not supported by this server)"
        if err["type"] == "missing":
            msg = "required"
        raise ApiError(400, f"{param}: {msg}", param) from None


class TextStream:
    """Token ids -> text, as they arrive, cut at the first stop string.

    The text is always the plain decode of every id so far (the same function task=generate uses), so a
    completion streamed in pieces concatenates to exactly the text returned whole. `take()` holds back what
    could still change or still turn out to be a stop string: a trailing run of "\ufffd" (an incomplete UTF-8
    sequence may be completed by the next token) and the last max(len(stop)) - 1 characters. `num_tokens`
    counts the tokens up to the one that completed the stop string, so it does not depend on how many tokens
    a speculative step delivered at once.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self.sent = 0
        """Characters of `text` already handed out by `take()`."""

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def push(self, new_ids: list[int]) -> None:
        if self.stopped or not new_ids:
            return
        old = len(self.ids)
        start = max(0, len(self.text.rstrip("\ufffd")) - self.hold)
        self.ids += new_ids
        self.text = self.tok.decode(self.ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
            self.ids = self.ids[:next((m for m in range(old + 1, len(self.ids)) if any(
                s in self.tok.decode(self.ids[:m]) for s in self.stops)), len(self.ids))]
            self.text = self.text[:cut]

    def take(self, final: bool = False) -> str:
        """Text not handed out yet (all of it when stopped or final; else short of the held-back tail)."""
        end = len(self.text)
        if not (final or self.stopped):
            end = max(self.sent, min(len(self.text.rstrip("\ufffd")), end - self.hold))
        out, self.sent = self.text[self.sent:end], end
        return out


@dataclass
class ServerStats:
    """The server's own counters, next to the scheduler's (`/metrics`)."""

    responses: Counter = field(default_factory=Counter)
    """HTTP status -> count, for /v1/completions."""
    finished: Counter = field(default_factory=Counter)
    """OpenAI finish_reason -> completions finished ("disconnected": the client left first)."""
    completion_tokens: int = 0
    request_steps: int = 0
    """Decode steps summed over finished requests: completion_tokens / request_steps is the served tau."""
    latency_sum: float = 0.0
    ttft_sum: float = 0.0


@dataclass
class ServerConfig:
    model_name: str
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    max_tokens: int = 16
    """A request's max_tokens when it sends none."""


def create_app(rt: Runtime, scheduler: Scheduler, cfg: ServerConfig) -> FastAPI:
    """The routes over a started (or soon started) scheduler; the caller owns the scheduler's lifetime."""
    app = FastAPI(title="spec-compiler", docs_url=None, redoc_url=None, openapi_url=None)
    stats = ServerStats()
    created = int(time.time())
    max_len = rt.plan.max_seq_len

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        if request.url.path == "/v1/completions":
            stats.responses[e.status] += 1
        return e.response()

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer <key>`)", None,
                           "authentication_error", "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the body has {int(length)} bytes, over the limit of {limit} (task.max_body_bytes)",
                           None, "invalid_request_error", "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the body is over the limit of {limit} bytes (task.max_body_bytes)", None,
                               "invalid_request_error", "body_too_large")
        return bytes(body)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created,
                                             "owned_by": "spec-compiler", "max_model_len": max_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(scheduler.stats(), stats),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse_completion(await read_body(request))
        if req.model is not None and req.model != cfg.model_name:
            raise ApiError(404, f"model: {req.model!r} is not served here (this server serves {cfg.model_name!r})",
                           "model", "invalid_request_error", "model_not_found")
        prompt_ids = req.prompt_ids(rt.tokenizer, rt.target.config.vocab_size)
        if not prompt_ids:
            raise ApiError(400, "prompt: empty after tokenization", "prompt")
        if len(prompt_ids) >= max_len:
            raise ApiError(400, f"prompt: {len(prompt_ids)} tokens do not fit the context: this model's maximum "
                           f"context length is {max_len} tokens, prompt and completion together",
                           "prompt", "invalid_request_error", "context_length_exceeded")
        base = rt.sampling
        sampling = SamplingParams(
            float(base.temperature if req.temperature is None else req.temperature),
            int(base.top_k if req.top_k is None else max(0, req.top_k)),
            float(base.top_p if req.top_p is None else req.top_p), base.acceptance)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(job: Job, new_ids: list[int], done: bool) -> None:  # the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (list(new_ids), done))
            except RuntimeError:  # the event loop is closed (server shut down)
                pass

        seed = secrets.randbits(62) if req.seed is None else req.seed
        job = Job(prompt_ids, req.max_tokens or cfg.max_tokens, sampling, seed=seed, on_event=on_event)
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, "the request queue is full; retry later", None, "rate_limit_error",
                           "queue_full") from None
        except InputError as e:
            raise ApiError(400, f"{e.where}: {e.reason}", e.where.split(".")[0]) from None
        stats.responses[200] += 1
        cid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": cfg.model_name}
        text = TextStream(rt.tokenizer, req.stop_list)
        t0 = time.perf_counter()
        first: list[float] = []

        async def next_event() -> tuple[list[int], bool]:
            new, done = await events.get()
            if new and not first:
                first.append(time.perf_counter())
            text.push(new)
            if text.stopped and not done:
                scheduler.cancel(job)  # the tokens after the stop string are not needed
                return new, True
            return new, done

        def finish_reason() -> str:
            reason = "stop" if text.stopped else FINISH.get(job.finish_reason, "abort")
            stats.finished[reason] += 1
            stats.completion_tokens += text.num_tokens
            stats.request_steps += len(job.result.accept_lengths) if job.result is not None else 0
            stats.latency_sum += time.perf_counter() - t0
            stats.ttft_sum += (first[0] if first else time.perf_counter()) - t0
            return reason

        def usage() -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": text.num_tokens,
                    "total_tokens": len(prompt_ids) + text.num_tokens}

        if not req.stream:
            async def disconnected() -> None:  # the body is read: the next ASGI message is the disconnect
                while (await request.receive())["type"] != "http.disconnect":
                    pass

            gone = asyncio.ensure_future(disconnected())
            try:
                done = False
                while not done:
                    get = asyncio.ensure_future(next_event())
                    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():  # the client went away: free the row
                        get.cancel()
                        scheduler.cancel(job)
                        stats.finished["disconnected"] += 1
                        return PlainTextResponse("", status_code=499)
                    done = get.result()[1]
            finally:
                gone.cancel()
            reason = finish_reason()
            choice = {"text": text.take(final=True), "index": 0, "logprobs": None, "finish_reason": reason}
            if req.return_token_ids:
                choice["token_ids"] = text.ids
                head["prompt_token_ids"] = prompt_ids
            return {**head, "choices": [choice], "usage": usage()}

        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def stream():
            done, ids_sent, first_chunk = False, 0, True
            try:
                while not done:
                    _, done = await next_event()
                    delta = text.take(final=done)
                    if delta or done or (req.return_token_ids and text.num_tokens > ids_sent):
                        reason = finish_reason() if done else None
                        choice = {"text": delta, "index": 0, "logprobs": None, "finish_reason": reason}
                        extra = {"prompt_token_ids": prompt_ids} if req.return_token_ids and first_chunk else {}
                        if req.return_token_ids:
                            choice["token_ids"], ids_sent = text.ids[ids_sent:], text.num_tokens
                        first_chunk = False
                        yield sse({**head, **extra, "choices": [choice]} | ({"usage": None} if include_usage else {}))
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                if not done:  # the client went away (or the server is stopping): free the row
                    scheduler.cancel(job)
                    stats.finished["disconnected"] += 1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---- /metrics ----------------------------------------------------------------------------------------
METRICS = {  # stats key -> (metric name, type, help)
    "requests_total": ("spec_scheduler_requests_total", "counter", "Requests submitted to the scheduler."),
    "rejected_total": ("spec_rejected_total", "counter", "Requests refused because the queue was full (HTTP 429)."),
    "tokens_total": ("spec_tokens_generated_total", "counter", "Tokens generated, all requests."),
    "steps": ("spec_steps_total", "counter", "Batched decode steps run."),
    "tau": ("spec_tau", "gauge", "Mean tokens per request per target forward (accepted drafts + 1)."),
    "goodput_tok_s": ("spec_goodput_tokens_per_second", "gauge", "Generated tokens per second (recent)."),
    "queue_length": ("spec_queue_length", "gauge", "Requests waiting for a cache row."),
    "running": ("spec_running_requests", "gauge", "Requests holding a cache row."),
    "step_time_s": ("spec_step_time_seconds", "gauge", "Time of one batched step (moving average)."),
    "k": ("spec_speculation_length", "gauge", "Current speculation length (draft tokens per request)."),
}


def prometheus_text(s: dict, server: ServerStats) -> str:
    """Prometheus text exposition (format 0.0.4) of the scheduler's stats and the server's counters; stats
    keys without an entry in METRICS are exported as `spec_scheduler_<key>` gauges."""
    out: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, Any]]) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {float(v)!r}" if isinstance(v, float) else f"{name}{labels} {int(v)}"
                   for labels, v in samples)

    metric("spec_requests_total", "counter", "Requests finished in the scheduler, by finish reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(s.get("finished_by_reason", {}).items())])
    metric("spec_acceptance_rate", "gauge", "P(draft position accepted | drafted), per position (0-based).",
           [(f'{{position="{i}"}}', float(v)) for i, v in enumerate(s.get("per_position_acceptance", []))])
    for key, value in s.items():
        if key in ("finished_by_reason", "per_position_acceptance"):
            continue
        if key in METRICS:
            metric(*METRICS[key], [("", value)])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metric(f"spec_scheduler_{key}", "gauge", f"Scheduler stat {key}.", [("", value)])
        elif isinstance(value, str):
            metric(f"spec_scheduler_{key}_info", "gauge", f"Scheduler setting {key} (the label).",
                   [(f'{{{key}="{value}"}}', 1)])
    metric("spec_http_responses_total", "counter", "/v1/completions responses by HTTP status.",
           [(f'{{code="{k}"}}', v) for k, v in sorted(server.responses.items())])
    metric("spec_completions_total", "counter", "Completions finished, by OpenAI finish_reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(server.finished.items())])
    metric("spec_completion_tokens_total", "counter", "Completion tokens returned to clients.",
           [("", server.completion_tokens)])
    metric("spec_request_steps_total", "counter", "Decode steps summed over finished requests "
           "(completion tokens / this = served tau).", [("", server.request_steps)])
    metric("spec_request_latency_seconds_sum", "counter", "Sum of end-to-end completion latencies.",
           [("", server.latency_sum)])
    metric("spec_time_to_first_token_seconds_sum", "counter", "Sum of times to the first token.",
           [("", server.ttft_sum)])
    return "\n".join(out) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample in a Prometheus text page (the load benchmark reads /metrics)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# ---- running it ------------------------------------------------------------------------------------------
def resolve_api_key(configured: Optional[str]) -> Optional[str]:
    """`task.api_key`, else $SPEC_API_KEY, else None (no authentication)."""
    key = configured if configured is not None else os.environ.get(API_KEY_ENV)
    return key or None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the caller knows the port before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


class BackgroundServer:
    """uvicorn serving `app` in a thread (tests and the load benchmark): `with BackgroundServer(app) as s:
    s.url`. The scheduler is the caller's to start and stop."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """uvicorn on a bound socket (`bind`) in this thread, until Ctrl-C / SIGTERM."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal under the handler it found:
    # for SIGTERM (a process manager's stop) that handler ends the run the way Ctrl-C does, so the caller still
    # stops the scheduler and writes its result instead of the process dying by the signal's default action.
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(sig, frame) -> None:
    raise KeyboardInterrupt


def run_serve(rt: Runtime, cfg, job) -> dict:
    """task=serve: the scheduler (`serving` group) and the HTTP server until Ctrl-C / SIGTERM; returns the final
    stats."""
    from spec_compiler.errors import ConfigError
    t = cfg.task
    key = resolve_api_key(t.api_key)
    name = t.served_model_name or rt.plan.name
    scheduler = Scheduler(rt, cfg.serving)
    app = create_app(rt, scheduler, ServerConfig(name, key, t.max_body_bytes, t.max_new_tokens))
    try:
        sock = bind(t.host, t.port)
    except OSError as e:
        raise ConfigError("task.port" if e.errno == 98 else "task.host", f"cannot listen on {t.host}:{t.port} "
                          f"({e.strerror})", t.port if e.errno == 98 else t.host) from None
    if key is None and t.host not in ("127.0.0.1", "localhost", "::1"):
        import warnings
        warnings.warn(f"task.host={t.host}: the server is reachable from the network and has no API key "
                      f"(set ${API_KEY_ENV} or task.api_key)", stacklevel=2)
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port}/v1 ({cfg.serving.policy.value} speculation, up to "
          f"{cfg.serving.max_batch_size} requests per step, {cfg.serving.max_queue} waiting; "
          f"{'API key required' if key else 'no API key'}); Ctrl-C stops", flush=True)
    scheduler.start()
    try:
        run_server(app, sock)
    except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down on: stopping is the normal end
        pass
    finally:
        scheduler.stop()
    return {"task": "serve", "plan_hash": rt.plan.plan_hash(), "model": name, **scheduler.stats()}
