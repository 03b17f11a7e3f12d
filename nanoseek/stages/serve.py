"""`nanoseek serve`: an OpenAI-compatible HTTP server over the engine's continuous batching, and a chat page.

    nanoseek serve --ckpt runs/speedrun/sft [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--max-queue 256]
                   [--api-key KEY] [--no-access-log]

Endpoints follow OpenAI's API reference (platform.openai.com/docs/api-reference): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions` (both streaming as server-sent events ending in
`data: [DONE]`), `GET /health`, `GET /info` (what the checkpoint was trained on, an example question in that
task's format, the default sampling) and the chat page at `/`. A request without temperature or top_p is
sampled at R1's setting (evaluation.R1_SAMPLING), as eval, chat and generate are. Chat uses the R1 template
(template.conversation); the reasoning comes back as `reasoning_content` (DeepSeek's API name) and `reasoning`
(vLLM's), the answer as `content`. Unknown fields are ignored; invalid values get a 400 naming the field;
when the running batch and the bounded queue are full a request gets a 429 at once.

With an API key (--api-key, or NANOSEEK_API_KEY) every /v1 request must send `Authorization: Bearer KEY` or
gets a 401; the page, /health and /info stay open (see RequireKey). Each request leaves one access-log line on
stderr (see AccessLog) unless --no-access-log.

One worker thread steps the engine's Batcher; the asyncio thread parses requests, submits them and streams
each request's tokens as the engine produces them. A client that disconnects cancels its requests, and their
slots are freed at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from ..engine import Batcher, Request, SamplingParams, sequence_seed
from ..evaluation import R1_SAMPLING
from ..options import ComputeOptions, check, option
from ..template import CHAT_STOP, conversation, held_suffix, split_reasoning

log = logging.getLogger(__name__)
PAGE = Path(__file__).parent.parent / "static" / "chat.html"


@dataclass(kw_only=True)
class ServeConfig(ComputeOptions):
    """Serve a checkpoint: /v1/models, /v1/completions and /v1/chat/completions (streaming as server-sent events),
    /health, /info (what the checkpoint's run trained on, with an example question) and the chat page at /.
    Binds 127.0.0.1 unless --host says otherwise; Ctrl-C drains and stops."""

    ckpt: str = option(help="checkpoint directory, or a run directory (its latest checkpoint); needs tokenizer.json")
    host: str = option("127.0.0.1", help="interface to bind (0.0.0.0 exposes the server)")
    port: int = option(8000, help="TCP port (0: any free port)", min=0, max=65535)
    max_batch: int = option(32, help="sequences decoded together (cache rows)", min=1)
    max_queue: int = option(256, help="sequences waiting for a row; beyond it: HTTP 429", min=0)
    model_name: str = option("", help="model id the API reports (empty: the checkpoint directory's name)")
    grace: float = option(5.0, help="seconds in-flight requests get to finish on Ctrl-C", min=0)
    api_key: str = option("", help="require 'Authorization: Bearer KEY' on every /v1 request (default: "
                          "$NANOSEEK_API_KEY; neither: no key)", metavar="KEY")
    no_access_log: bool = option(False, help="no per-request line (method, path, status, time, tokens) on stderr")

    def __post_init__(self):
        check(self)


# Shown by `nanoseek serve --help` (the API default is not a flag, so the description names it).
ServeConfig.__doc__ += (f" Requests that set no temperature or top_p sample at temperature {R1_SAMPLING.temperature},"
                        f" top-p {R1_SAMPLING.top_p} (R1's evaluation setting).")


class APIError(Exception):
    """An OpenAI-style error response: status, message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- request fields


def _get(body: dict, name: str, kinds: tuple, default=None, check=None, need: str = ""):
    """body[name] if it has one of `kinds` (JSON types; bool is never a number) and passes check."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
                 dict: "an object"}
        wanted = "a number" if float in kinds else " or ".join(names[k] for k in kinds)
        raise APIError(400, f"'{name}' must be {wanted}, got {json.dumps(value)[:40]}", name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' must be {need}, got {json.dumps(value)[:40]}", name)
    return value


@dataclass
class Options:
    """The sampling and response options shared by both endpoints."""

    max_tokens: int | None
    max_tokens_field: str
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool


def parse_options(body: dict) -> Options:
    num = (int, float)
    field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, field_name, (int,), None, lambda v: v >= 1, "at least 1")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 16 non-empty strings", "stop")
    stream_options = _get(body, "stream_options", (dict,), {})
    return Options(
        max_tokens=max_tokens, max_tokens_field=field_name,
        temperature=float(_get(body, "temperature", num, R1_SAMPLING.temperature, lambda v: 0 <= v <= 2,
                               "between 0 and 2")),
        top_p=float(_get(body, "top_p", num, R1_SAMPLING.top_p, lambda v: 0 < v <= 1, "in (0, 1]")),
        top_k=_get(body, "top_k", (int,), 0, lambda v: v >= -1, "-1, 0 (off) or a positive integer"),
        seed=_get(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
        stop=stop, n=_get(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "between 1 and 16"),
        stream=_get(body, "stream", (bool,), False),
        include_usage=bool(_get(stream_options, "include_usage", (bool,), False)),
    )


def chat_prompt(body: dict) -> str:
    """The R1 prompt of a chat request's messages (validated: roles, text content, ends with a user turn)."""
    messages = _get(body, "messages", (list,), None)
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, developer, user or assistant, got "
                                f"{json.dumps(role)[:40]}", f"messages[{i}].role")
        clean.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), i)})
    try:
        return conversation(clean)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def completion_prompts(body: dict, tokenizer, vocab: int) -> list[list[int]]:
    """The token ids of a completion request's prompt: a string, strings, token ids, or lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
    out = []
    for p in prompt:
        ids = tokenizer.encode(p) if isinstance(p, str) else p
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise APIError(400, f"'prompt' token ids must be integers in [0, {vocab})", "prompt")
        if not ids:
            raise APIError(400, "'prompt' must not be empty", "prompt")
        out.append(ids)
    return out


# ----------------------------------------------------------------------------- the worker thread


class QueueFull(Exception):
    pass


class BatchWorker:
    """Steps a Batcher in its own thread while requests are outstanding; admission is bounded. The token events
    of a step go to the asyncio loop in one hand-over after the step (one wake-up per step, not per token)."""

    def __init__(self, batcher: Batcher, max_queue: int):
        self.batcher, self.capacity = batcher, batcher.max_batch + max_queue
        self.cond = threading.Condition()
        self.outstanding, self.stopping = 0, False
        self.counts = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self.thread = threading.Thread(target=self._run, name="nanoseek-worker", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.outbox: list[tuple[asyncio.Queue, tuple]] = []  # worker thread only

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, reqs: list[Request]) -> None:
        """Queue all of reqs or none (QueueFull); ValueError if one cannot run at all."""
        for r in reqs:
            self.batcher.check(r)
        with self.cond:
            if self.outstanding + len(reqs) > self.capacity:
                self.counts["rejected"] += 1
                raise QueueFull
            self.outstanding += len(reqs)
            for r in reqs:
                self.batcher.submit(r)
            self.cond.notify()

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        """Worker thread: an event for an asyncio queue, delivered after the current step."""
        self.outbox.append((queue, event))

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        if batch:
            try:
                self.loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

    def finished(self, r: Request) -> None:
        """Called (in the worker thread) once per request as it leaves."""
        with self.cond:
            self.outstanding -= 1
            self.counts[{"cancelled": "cancelled", "error": "failed"}.get(r.finish_reason, "completed")] += 1

    def status(self) -> dict:
        b = self.batcher
        return {"running": len(b.active), "waiting": len(b.waiting), "max_batch": b.max_batch,
                "capacity": self.capacity, **self.counts}

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.batcher.busy and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
            try:
                self.batcher.step()
            except Exception:  # a bug must not take the server down: fail what is in flight and go on
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all()
            self._flush()

    def _fail_all(self) -> None:
        for r in self.batcher.drain():
            r.finish_reason = "error"
            if r.listener is not None:
                r.listener(r, None)


def _deliver(batch: list) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


# ----------------------------------------------------------------------------- one API call


class Call:
    """One API request: its choices (engine requests), their event queue, and the text shown so far."""

    def __init__(self, worker: BatchWorker, prompts: list[list[int]], max_new: list[int], opts: Options, chat: bool,
                 top_logprobs: int | None):
        self.worker, self.opts, self.chat = worker, opts, chat
        self.top_logprobs = top_logprobs
        self.events: asyncio.Queue = asyncio.Queue()
        self.stops = opts.stop + (CHAT_STOP if chat else [])
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.reqs = []
        for p, budget in zip(prompts, max_new):
            for j in range(opts.n):  # choice j of a seeded call: the per-sequence seed every stage uses
                seed = sequence_seed(opts.seed, j) % 2**64 if opts.seed is not None else secrets.randbits(63)
                params = SamplingParams(max_new_tokens=budget, temperature=opts.temperature,
                                        top_k=max(opts.top_k, 0), top_p=opts.top_p, stop=self.stops)
                listener = functools.partial(self._listen, len(self.reqs))
                self.reqs.append(Request(p, params, seed=seed, top_logprobs=top_logprobs, listener=listener))
        self.shown = [["", ""] for _ in self.reqs]  # per choice: (reasoning, content) or (text, "") sent so far

    def _listen(self, index: int, r: Request, token) -> None:
        """Worker thread: snapshot the event for the asyncio side."""
        new = token is not None and r.top_logprobs is not None
        event = (index, token, r.text, r.finish_reason, r.raw_logprobs[-1] if new else None, r.top[-1] if new else None)
        if r.done:
            self.worker.finished(r)
        self.worker.post(self.events, event)

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()

    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.reqs)

    def usage(self) -> dict:
        c = self.completion_tokens()
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": c, "total_tokens": self.prompt_tokens + c}

    def delta(self, index: int, text: str, final: bool) -> tuple[str, str]:
        """New (reasoning, content) text of a choice (completions: (text, "")) given its decoded text so far."""
        cut = [text.find(s) for s in self.stops if s in text]
        if cut:
            text = text[: min(cut)]
        elif not final:
            text = text[: len(text) - held_suffix(text, self.stops)]
        parts = split_reasoning(text, partial=not final) if self.chat else (text, "")
        new = []
        for k, part in enumerate(parts):
            sent = self.shown[index][k]
            new.append(part[len(sent):] if part.startswith(sent) else "")
            self.shown[index][k] = part if part.startswith(sent) else sent
        return new[0], new[1]

    async def events_until_done(self):
        left = len(self.reqs)
        while left:
            event = await self.events.get()
            if event[3] is not None:
                left -= 1
            yield event


def finish_name(reason: str | None) -> str | None:
    """The engine's finish reasons as OpenAI names them."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


# ----------------------------------------------------------------------------- response bodies


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Formatter:
    """OpenAI's chat.completion / text_completion bodies and chunks for one call."""

    def __init__(self, call: Call, tokenizer, model: str):
        self.call, self.tokenizer, self.chat = call, tokenizer, call.chat
        kind = "chatcmpl" if self.chat else "cmpl"
        self.base = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.offsets = [0] * len(call.reqs)  # completions' text_offset of the next token

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, index: int, entries: list) -> dict | None:
        """entries: (token, logprob, [(id, logprob)] best) of the tokens a choice or chunk covers."""
        if self.call.top_logprobs is None:
            return None
        if self.chat:
            def item(t, lp):
                s = self._piece(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**item(t, lp), "top_logprobs": [item(i, b) for i, b in best]}
                                for t, lp, best in entries]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, best in entries:
            s = self._piece(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._piece(i): b for i, b in best})
            out["text_offset"].append(self.offsets[index])
            self.offsets[index] += len(s)
        return out

    def chunk(self, index: int, text: tuple[str, str], logprobs, finish) -> dict | None:
        """One streamed chunk, or None when it would carry nothing."""
        reasoning, content = text
        if self.chat:
            delta = {"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {}
            delta.update({"content": content} if content else {})
            if not (delta or logprobs or finish):
                return None
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            if not (reasoning or logprobs or finish):
                return None
            choice = {"index": index, "text": reasoning, "logprobs": logprobs, "finish_reason": finish}
        return self._wrap([choice])

    def _wrap(self, choices: list, usage: dict | None = None) -> dict:
        kind = ("chat.completion.chunk" if self.chat else "text_completion")
        extra = {"usage": usage} if self.call.opts.include_usage else {}
        return {**self.base, "object": kind, "choices": choices, **extra}

    def opening(self) -> list[dict]:
        """Chat streams open each choice with the assistant role, as OpenAI's do."""
        if not self.chat:
            return []
        return [self._wrap([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(len(self.call.reqs))]

    def usage_chunk(self) -> dict:
        return {**self._wrap([], self.call.usage())}

    def whole(self, texts: list[tuple[str, str]], logprobs: list, finishes: list) -> dict:
        choices = []
        for i, ((reasoning, content), lp, finish) in enumerate(zip(texts, logprobs, finishes)):
            if self.chat:
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning,
                           "reasoning": reasoning}
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": reasoning, "logprobs": lp, "finish_reason": finish})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.base, "object": kind, "choices": choices, "usage": self.call.usage()}


async def stream(call: Call, fmt: Formatter):
    """Server-sent events of a call; a disconnect cancels this generator, and with it the call's requests."""
    try:
        for c in fmt.opening():
            yield _sse(c)
        async for index, token, text, reason, raw, top in call.events_until_done():
            if reason == "error":
                yield _sse(APIError(500, "the engine failed on this request", kind="server_error").body())
                continue
            lp = fmt.logprobs(index, [(token, raw, top)]) if raw is not None else None
            text_delta = call.delta(index, text, final=reason is not None)
            finish = finish_name(reason) if reason is not None else None
            if (c := fmt.chunk(index, text_delta, lp, None)) is not None:
                yield _sse(c)
            if finish is not None:
                yield _sse(fmt.chunk(index, ("", ""), None, finish))
        if call.opts.include_usage:
            yield _sse(fmt.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        call.cancel()  # no-op for requests already finished


async def whole_response(call: Call, fmt: Formatter) -> dict:
    """The non-streamed body of a call: every event awaited, then the choices as one chat.completion or
    text_completion object."""
    n = len(call.reqs)
    texts, entries, finishes = [""] * n, [[] for _ in range(n)], [None] * n
    async for index, token, text, reason, raw, top in call.events_until_done():
        if raw is not None:
            entries[index].append((token, raw, top))
        texts[index], finishes[index] = text, reason
    if "error" in finishes:
        raise APIError(500, "the engine failed on this request", kind="server_error")
    return fmt.whole([call.delta(i, t, final=True) for i, t in enumerate(texts)],
                     [fmt.logprobs(i, e) for i, e in enumerate(entries)], [finish_name(f) for f in finishes])


# ----------------------------------------------------------------------------- the key and the access log


class RequireKey:
    """ASGI middleware: with a key set, a request under /v1 without `Authorization: Bearer KEY` gets OpenAI's 401.

    Only /v1 is guarded, as vLLM's --api-key guards it: the page is a static file that holds no data (it asks for
    the key and sends it with its own /v1 calls), /health must answer a load balancer's probe that carries no
    credentials, and /info says what /v1/models would (the model) plus the training task, not model output. Any
    /v1 path is checked before routing, so an endpoint added later is guarded without remembering to."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # compare_digest: the time taken must not tell a guesser how many leading bytes were right
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        message = ("Incorrect API key provided." if given else "You didn't provide an API key.") + \
            " Send the server's key (nanoseek serve --api-key, or NANOSEEK_API_KEY) as 'Authorization: Bearer KEY'."
        error = APIError(401, message, code="invalid_api_key")
        await JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class AccessLog:
    """ASGI middleware: one line per request on stderr, as uvicorn's and vLLM's access logs print, plus the time
    and the tokens of an API call:

        127.0.0.1:50412 - "POST /v1/chat/completions HTTP/1.1" 200 412.3 ms tokens_in=25 tokens_out=7

    The line is written as the last body message goes out (for a stream, its end after `data: [DONE]`), so
    its time is the whole response's; a response cut short (a client gone mid-stream) is logged when the app
    returns. A handler puts its Call in scope["nanoseek.access"]["call"] for the tokens (a dict of ours, so the
    entry survives a layer below that copies the scope)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, logged = time.perf_counter(), 500, False  # 500: the app raised before it answered
        scope["nanoseek.access"] = note = {}

        async def send_and_log(message):
            nonlocal status, logged
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and not logged:
                logged = True
                self.write(scope, status, start, note.get("call"))
            await send(message)

        try:
            await self.app(scope, receive, send_and_log)
        finally:
            if not logged:
                self.write(scope, status, start, note.get("call"))

    @staticmethod
    def write(scope, status: int, start: float, call) -> None:
        client = "%s:%d" % tuple(scope["client"]) if scope.get("client") else "-"
        query = f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
        line = (f'{client} - "{scope["method"]} {scope["path"]}{query} HTTP/{scope.get("http_version", "1.1")}" '
                f"{status} {(time.perf_counter() - start) * 1e3:.1f} ms")
        if call is not None:
            line += f" tokens_in={call.prompt_tokens} tokens_out={call.completion_tokens()}"
        print(line, file=sys.stderr, flush=True)  # sys.stderr looked up now: a test's capture, a redirect


# ----------------------------------------------------------------------------- the app


async def _api_error(http, e: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


def create_app(model, tokenizer, cfg: ServeConfig, name: str, trained_on: dict | None = None):
    """The FastAPI app serving `model` (eval mode, its dtype and device as given) under the id `name`;
    `trained_on` (evaluation.trained_on) is what /info reports and the page offers as an example."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    worker = BatchWorker(Batcher(model, tokenizer, max_batch=cfg.max_batch), cfg.max_queue)
    context, vocab = model.cfg.max_seq_len, model.cfg.vocab_size

    @asynccontextmanager
    async def lifespan(app):
        worker.start(asyncio.get_running_loop())
        yield
        worker.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    async def page(http):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(http):
        return JSONResponse({"status": "ok", "model": name, **worker.status()})

    async def info(http):
        return JSONResponse({"model": name, "max_model_len": context, "trained_on": trained_on,
                             "sampling": R1_SAMPLING._asdict()})

    async def models(http):
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                          "owned_by": "nanoseek", "max_model_len": context}]})

    async def handle(http, chat: bool):
        prompts, max_new, opts, top_logprobs = parse_call(await _json_body(http), chat, tokenizer, name, context,
                                                          vocab)
        call = Call(worker, prompts, max_new, opts, chat, top_logprobs)
        http.scope.get("nanoseek.access", {})["call"] = call  # its tokens go in the access-log line
        if len(call.reqs) > worker.capacity:
            raise APIError(400, f"{len(call.reqs)} sequences (prompts × n) exceed the server's capacity of "
                                f"{worker.capacity}", "n")
        try:
            worker.submit(call.reqs)
        except QueueFull:
            raise APIError(429, "the server is at capacity (running batch and queue full); retry later",
                           kind="rate_limit_error", code="rate_limit_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt") from None
        fmt = Formatter(call, tokenizer, name)
        if opts.stream:
            return StreamingResponse(stream(call, fmt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(http, call))
        try:
            return JSONResponse(await whole_response(call, fmt))
        finally:
            watcher.cancel()

    async def chat_completions(http):
        return await handle(http, chat=True)

    async def completions(http):
        return await handle(http, chat=False)

    # Starlette-level routes: the handlers read the raw request and validate it themselves (OpenAI-style errors)
    app.add_exception_handler(APIError, _api_error)
    app.add_route("/", page, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/info", info, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    if cfg.api_key:
        app.add_middleware(RequireKey, key=cfg.api_key)
    if not cfg.no_access_log:
        app.add_middleware(AccessLog)  # added last, so outermost: a 401 is logged too
    return app


def parse_call(body: dict, chat: bool, tokenizer, name: str, context: int, vocab: int):
    """A request body's prompts (token ids), new-token budgets, options and log-prob setting, or APIError."""
    if body.get("model") not in (None, name):
        raise APIError(404, f"The model {json.dumps(body['model'])[:60]} does not exist; this server serves "
                            f"{name!r}", "model", code="model_not_found")
    opts = parse_options(body)
    if chat:
        prompts = [tokenizer.encode(chat_prompt(body))]
        want = _get(body, "logprobs", (bool,), False)
        top = _get(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= 20, "between 0 and 20")
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top_logprobs = (top or 0) if want else None
    else:
        prompts = completion_prompts(body, tokenizer, vocab)
        top_logprobs = _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5, "between 0 and 5")
    return prompts, _budget(prompts, opts, context, "messages" if chat else "prompt"), opts, top_logprobs


async def _json_body(http) -> dict:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _budget(prompts: list[list[int]], opts: Options, context: int, prompt_field: str) -> list[int]:
    """New tokens each prompt may get: max_tokens, or by default the rest of the context."""
    out = []
    for p in prompts:
        if len(p) >= context:
            raise APIError(400, f"the prompt has {len(p)} tokens; the model's context is {context} tokens",
                           prompt_field)
        if opts.max_tokens is not None and len(p) + opts.max_tokens > context:
            raise APIError(400, f"'{opts.max_tokens_field}' of {opts.max_tokens} + the prompt's {len(p)} tokens "
                                f"exceed the model's context of {context} tokens", opts.max_tokens_field)
        out.append(opts.max_tokens or context - len(p))
    return out


async def _cancel_on_disconnect(http, call: Call) -> None:
    """Non-streaming calls: cancel the call's requests if the client goes away before the answer."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return


# ----------------------------------------------------------------------------- command line


def run(cfg: ServeConfig) -> None:
    """Load the checkpoint and serve it until Ctrl-C. No --api-key: the key in NANOSEEK_API_KEY, if any (an
    environment variable keeps the secret out of `ps` and shell history)."""
    import uvicorn

    from ..checkpoint import load
    from ..evaluation import trained_on
    from ..runtime import prepare_inference, resolve, set_threads

    cfg = replace(cfg, api_key=cfg.api_key or os.environ.get("NANOSEEK_API_KEY", ""))
    set_threads(cfg.threads)
    model, tokenizer = load(cfg.ckpt, require_tokenizer=True)
    rt = resolve(cfg.device, cfg.precision, rows=cfg.max_batch)  # a full batch decodes together
    model = prepare_inference(model, rt).eval()
    name = cfg.model_name or Path(cfg.ckpt).resolve().name
    app = create_app(model, tokenizer, cfg, name, trained_on(cfg.ckpt))
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=cfg.grace,
                            log_level="info", access_log=False)
    key = ", key required" if cfg.api_key else ""
    print(f"nanoseek serve: {name} ({rt.precision} on {rt.device}, batch {cfg.max_batch}, queue {cfg.max_queue}) "
          f"at http://{cfg.host}:{cfg.port}/ (chat page) and /v1 (OpenAI API{key}); Ctrl-C stops", file=sys.stderr)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled after shutting down cleanly
        pass
    print("nanoseek serve: stopped", file=sys.stderr)
