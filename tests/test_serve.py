"""`nanoseek serve` driven by the official `openai` client against a live server on 127.0.0.1: both endpoints,
streaming and not, the reasoning split, stop strings, seeds, log-probs, bad input (400), a full queue (429), a
burst, client disconnects, 32 concurrent streams, the API key (401), the access log, and Ctrl-C on the real
command."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .live_server import ANSWER, CONTENT, REASONING, LiveServer, scripted_model, tokenizer
from nanoseek.template import conversation, split_reasoning

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    with LiveServer(scripted_model(tok), tok, max_batch=32, max_queue=64) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url) as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------------- the happy paths


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = get(server.url + "/health")
    assert health["status"] == "ok" and health["max_batch"] == 32
    with urllib.request.urlopen(server.url + "/") as r:
        page = r.read().decode()
    assert "<title>nanoseek chat</title>" in page and 'fetch("/v1/chat/completions"' in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere: works offline


def test_chat_splits_reasoning_from_the_answer(client, tok):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50)
    choice = r.choices[0]
    assert choice.message.content == CONTENT and choice.finish_reason == "stop"
    extra = choice.message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == REASONING
    assert r.usage.prompt_tokens == len(tok.encode(conversation(HELLO)))
    assert r.usage.completion_tokens == len(tok.encode(ANSWER)) and r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_chat_stream_gives_the_same_answer_in_pieces(client):
    stream = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    def joined(key):
        return "".join((c.choices[0].delta.model_extra or {}).get(key) or "" for c in chunks if c.choices)

    reasoning, vllm_name = joined("reasoning_content"), joined("reasoning")
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert reasoning == vllm_name == REASONING and "".join(content) == CONTENT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(client, tok):
    prompt = "User: hello there\nAssistant: <think>"
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=40)
    assert r.choices[0].text == ANSWER and r.choices[0].finish_reason == "stop"  # ended by eos
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 8  # eos counted
    pieces = list(client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=40, stream=True))
    assert "".join(c.choices[0].text for c in pieces) == ANSWER and pieces[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt=[prompt, "hello ping"], temperature=0, max_tokens=4)
    assert [c.text for c in r.choices] == [" The cat sat</think>", " pong ping pong ping"]
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 8
    ids = tok.encode("hello ping")
    r = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=2)
    assert r.choices[0].text == " pong ping" and r.usage.prompt_tokens == len(ids)


def test_stop_strings_end_the_text_before_them(client):
    r = client.completions.create(model="tiny", prompt="hello ping", temperature=0, max_tokens=30, stop=[" ping"])
    assert r.choices[0].text == " pong" and r.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model="tiny", prompt="hello ping", temperature=0, max_tokens=30,
                                            stop=["ng pi"], stream=True))
    assert "".join(c.choices[0].text for c in pieces) == " po"
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=30, stop="cat")
    assert r.choices[0].message.model_extra["reasoning_content"] == "The" and r.choices[0].message.content == ""
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens_and_max_completion_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    assert r.choices[0].message.model_extra["reasoning_content"] == "The cat" and r.choices[0].message.content == ""
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3


def test_seed_reproduces_samples_whatever_else_runs(client, server):
    def sample(seed, n=1):
        r = client.completions.create(model="tiny", prompt="the quick", temperature=1.0, max_tokens=12, seed=seed, n=n)
        return [c.text for c in r.choices]

    first = sample(7, n=3)
    assert len(set(first)) == 3  # the choices of one call are different samples
    assert sample(7, n=3) == first and sample(7) == first[:1]  # choice j's seed does not depend on n
    assert sample(8) != first[:1]

    async def crowd():  # the same request among 12 others of all kinds
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        others = [aclient.completions.create(model="tiny", prompt=p, temperature=t, max_tokens=20)
                  for p in ("a b c", "hello ping", "the lazy dog") for t in (0.0, 0.5, 1.0, 1.5)]
        mine = aclient.completions.create(model="tiny", prompt="the quick", temperature=1.0, max_tokens=12, seed=7,
                                          n=3)
        done = await asyncio.gather(*others[:6], mine, *others[6:])
        await aclient.close()
        return [c.text for c in done[6].choices]

    assert asyncio.run(crowd()) == first


def test_logprobs(client, tok):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 7
    assert "".join(e.token for e in content) == ANSWER
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert bytes(e.bytes).decode() == e.token
    r = client.completions.create(model="tiny", prompt="the quick", temperature=1.0, max_tokens=5, logprobs=2, seed=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].logprobs is None


def test_unknown_fields_are_ignored(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50,
                                       extra_body={"frobnicate": True, "presence_penalty": 0.5, "user": "x"})
    assert r.choices[0].message.content == CONTENT


# ----------------------------------------------------------------------------- bad input


BAD = [
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "temperature": 3}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 100000}, "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": 600}, "max_completion_tokens"),
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "stop": [""]}, "stop"),
    ({"messages": HELLO, "seed": -1}, "seed"),
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_invalid_values_get_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", **body)
    assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["type"] == \
        "invalid_request_error"


def test_malformed_requests(server, client):
    status, body = post(server.url + "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(server.url + "/v1/completions", b'[1, 2]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    for prompt in ("", [], [-1], [10**6], 5):
        status, body = post(server.url + "/v1/completions", json.dumps({"prompt": prompt}).encode())
        assert status == 400 and body["error"]["param"] == "prompt", prompt
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt="word " * 600)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="tiny", prompt="a", logprobs=9)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert get(server.url + "/health")["status"] == "ok"


# ----------------------------------------------------------------------------- load


def test_32_concurrent_streams_complete_with_correct_usage(server, tok):
    words = ["a", "b", "c", "d", "e", "f", "g", "h"] * 4
    prompts = [f"User: {w}\nAssistant: <think>" if i % 2 else f"{w} ping" for i, w in enumerate(words)]

    async def one(aclient, prompt, i):
        stream = await aclient.completions.create(model="tiny", prompt=prompt, temperature=0.8, max_tokens=8 + i,
                                                  seed=i, stream=True, logprobs=0, extra_body={"top_k": 50},
                                                  stream_options={"include_usage": True})
        text, tokens, usage = "", 0, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].text
                tokens += len(c.choices[0].logprobs.tokens) if c.choices[0].logprobs else 0
            if c.usage:
                usage = c.usage
        return text, tokens, usage

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        out = await asyncio.gather(*(one(aclient, p, i) for i, p in enumerate(prompts)))
        await aclient.close()
        return out

    results = asyncio.run(run())
    assert len(results) == 32
    for (text, tokens, usage), prompt, i in zip(results, prompts, range(32)):
        assert usage.prompt_tokens == len(tok.encode(prompt))
        assert usage.completion_tokens == tokens and 1 <= tokens <= 8 + i
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_client_disconnect_frees_the_slot(server, client):
    before = server.worker.status()["cancelled"]
    stream = client.completions.create(model="tiny", prompt="hello ping", temperature=0, max_tokens=400, stream=True)
    got = []
    for chunk in stream:
        got.append(chunk.choices[0].text)
        if len(got) == 3:
            break
    stream.close()  # the client goes away mid-stream
    server.wait_until(lambda s: s["cancelled"] == before + 1 and s["running"] == 0, "the cancellation")
    assert "".join(got) == " pong ping pong"
    r = client.completions.create(model="tiny", prompt="hello ping", temperature=0, max_tokens=2)
    assert r.choices[0].text == " pong ping"


def test_full_queue_gets_429_and_a_burst_leaves_the_server_up(tok):
    with LiveServer(scripted_model(tok), tok, max_batch=1, max_queue=2) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        holders = [client.completions.create(model="tiny", prompt="hello ping", temperature=0, max_tokens=450,
                                             stream=True) for _ in range(3)]
        s.wait_until(lambda st: st["running"] == 1 and st["waiting"] == 2, "the batch and queue to fill")
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="hello ping", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):  # n counts: three more sequences never fit
            client.completions.create(model="tiny", prompt="a", max_tokens=2, n=3)

        async def burst(n=300):
            aclient = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)

            async def one():
                try:
                    r = await aclient.completions.create(model="tiny", prompt="hello ping", temperature=0,
                                                         max_tokens=2)
                    return r.choices[0].text
                except openai.RateLimitError:
                    return 429

            out = await asyncio.gather(*(one() for _ in range(n)))
            await aclient.close()
            return out

        outcomes = asyncio.run(burst())
        assert 429 in outcomes and all(o in (429, " pong ping") for o in outcomes)
        for h in holders:  # the admitted requests are served to completion
            text = "".join(c.choices[0].text for c in h)
            assert text == (" pong ping" * 225)
        assert get(s.url + "/health")["status"] == "ok"
        assert client.completions.create(model="tiny", prompt="hello ping", temperature=0,
                                         max_tokens=2).choices[0].text == " pong ping"
        s.wait_until(lambda st: st["running"] == st["waiting"] == 0, "the server to drain")
        assert s.worker.outstanding == 0


# ----------------------------------------------------------------------------- the API key and the access log (#39)


def get_status(url: str, headers: dict | None = None) -> tuple:
    """(status, headers, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def test_an_api_key_guards_every_v1_path_and_nothing_else(tok):
    with LiveServer(scripted_model(tok), tok, max_batch=2, api_key="s3cret") as s:
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        r = keyed.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50)
        assert r.choices[0].message.content == CONTENT and [m.id for m in keyed.models.list().data] == ["tiny"]
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cre", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert e.value.body["type"] == "invalid_request_error" and "Incorrect API key" in e.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="tiny", prompt="a", max_tokens=2, stream=True)
        for path in ("/v1/models", "/v1/no-such-endpoint"):  # before routing: a later endpoint is guarded too
            status, headers, body = get_status(s.url + path)
            assert status == 401 and headers.get("WWW-Authenticate") == "Bearer", path
            assert "didn't provide an API key" in json.loads(body)["error"]["message"]
        assert get_status(s.url + "/v1/models", {"Authorization": "Basic s3cret"})[0] == 401
        assert get_status(s.url + "/v1/models", {"Authorization": "bearer s3cret"})[0] == 200  # the scheme's case
        for path in ("/", "/health", "/info"):  # static page, probes, what the model is: no key
            assert get_status(s.url + path)[0] == 200, path
        assert "Authorization" in get_status(s.url + "/")[2]  # the page sends the key it is given


ACCESS = re.compile(r'(\S+) - "(\w+) (\S+) HTTP/[\d.]+" (\d{3}) \d+\.\d ms(?: tokens_in=(\d+) tokens_out=(\d+))?$')


def test_one_access_log_line_per_request_unless_silenced(tok, capsys):
    """Method, path, status and time of every request on stderr, and the tokens of an API call: a stream's line
    comes at its end, so it counts all the tokens."""
    with LiveServer(scripted_model(tok), tok, max_batch=2, api_key="k") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0)
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50)
        list(client.completions.create(model="tiny", prompt="hello ping", temperature=0, max_tokens=3, stream=True))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="a", max_tokens=0)
        get(s.url + "/health")
    # read once the server has stopped: every response, streams included, has written its line by then
    lines = [m.groups() for m in map(ACCESS.match, capsys.readouterr().err.splitlines()) if m]
    assert all(line[0].startswith("127.0.0.1:") for line in lines)
    prompt = str(len(tok.encode(conversation(HELLO))))
    expected = [("POST", "/v1/chat/completions", "200", prompt, "7"),
                ("POST", "/v1/completions", "200", str(len(tok.encode("hello ping"))), "3"),
                ("GET", "/v1/models", "401", None, None),
                ("POST", "/v1/completions", "400", None, None),
                ("GET", "/health", "200", None, None)]
    # in any order: the client leaves a stream at [DONE], maybe before the server sends the stream's end
    assert sorted((tuple(line[1:]) for line in lines), key=repr) == sorted(expected, key=repr)
    with LiveServer(scripted_model(tok), tok, max_batch=2, no_access_log=True) as s:
        get(s.url + "/health")
        openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0).models.list()
    assert not [line for line in capsys.readouterr().err.splitlines() if ACCESS.match(line)]


def test_the_command_takes_the_key_from_the_environment_unless_given(tmp_path, tok, monkeypatch):
    import uvicorn

    from nanoseek.checkpoint import save_model
    from nanoseek.stages import serve

    tok.save(tmp_path / "tokenizer.json")
    save_model(scripted_model(tok), tmp_path / "ckpt", tokenizer_file=tmp_path / "tokenizer.json")
    keys = []
    monkeypatch.setattr(serve, "create_app", lambda model, tokenizer, cfg, *args, **kw: keys.append(cfg.api_key))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    monkeypatch.setenv("NANOSEEK_API_KEY", "from-env")
    for flag in ("", "from-flag"):
        serve.run(serve.ServeConfig(ckpt=str(tmp_path / "ckpt"), port=0, threads=1, precision="fp32", api_key=flag))
    monkeypatch.delenv("NANOSEEK_API_KEY")
    serve.run(serve.ServeConfig(ckpt=str(tmp_path / "ckpt"), port=0, threads=1, precision="fp32"))
    assert keys == ["from-env", "from-flag", ""]


# ----------------------------------------------------------------------------- the command


def test_serve_command_stops_cleanly_on_ctrl_c(tmp_path, tok):
    from nanoseek.checkpoint import save_model

    tok.save(tmp_path / "tokenizer.json")
    save_model(scripted_model(tok), tmp_path / "ckpt", tokenizer_file=tmp_path / "tokenizer.json")
    from .live_server import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--ckpt", str(tmp_path / "ckpt"), "--port",
                             str(port), "--threads", "1", "--precision", "fp32"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "NANOSEEK_API_KEY": ""})  # no key
    try:
        deadline = time.monotonic() + 120  # guards against a hang only
        while True:
            try:
                health = get(f"http://127.0.0.1:{port}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        assert health["model"] == "ckpt"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="ckpt", messages=HELLO, temperature=0, max_tokens=50)
        assert r.choices[0].message.content == CONTENT
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err and "nanoseek serve: stopped" in err, err
    assert "127.0.0.1" in err


# ----------------------------------------------------------------------------- streaming reasoning split


PIECES = ["<think>", "</think>", "<answer>", "</answer>", " ", "  ", "\n", "a", "bc", "<", "</", "</th", "<ans", "x y"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14))
def test_partial_split_only_ever_grows_into_the_final_split(pieces):
    text = "".join(pieces)
    final = split_reasoning(text)
    for i in range(len(text) + 1):
        r, c = split_reasoning(text[:i], partial=True)
        assert final[0].startswith(r) and final[1].startswith(c), (text[:i], r, c, final)
    assert split_reasoning(text, partial=False) == final


# ----------------------------------------------------------------------------- the terminal chat, same template


# ----------------------------------------------------------------------------- defaults from the checkpoint (#39)


def test_requests_without_sampling_settings_get_r1s():
    """The API's default sampling is R1's 0.6 / top-p 0.95, as chat, generate and eval use (it was 1.0 / 1.0)."""
    from nanoseek.stages.serve import parse_options

    opts = parse_options({})
    assert (opts.temperature, opts.top_p) == (0.6, 0.95)
    opts = parse_options({"temperature": 1.0, "top_p": 1})
    assert (opts.temperature, opts.top_p) == (1.0, 1.0)


TRAINED = {"task": "chain_sum", "task_args": {"min_terms": 4, "max_terms": 4}, "source": "runs/rl/run.json",
           "example": "State the final answer to the following arithmetic problem: 1 + 2 - 3 + 4 ="}


def test_info_reports_what_the_model_trained_on_for_the_page(tok, monkeypatch):
    """/info gives the page the recorded task, an example question in its format and the default sampling; the
    page shows the example in the empty chat and starts its temperature field at that default."""
    import functools

    from nanoseek.stages import serve

    monkeypatch.setattr(serve, "create_app", functools.partial(serve.create_app, trained_on=TRAINED))
    with LiveServer(scripted_model(tok), tok, max_batch=2) as s:
        info = get(s.url + "/info")
        with urllib.request.urlopen(s.url + "/") as r:
            page = r.read().decode()
    assert info["trained_on"] == TRAINED and info["sampling"] == {"temperature": 0.6, "top_p": 0.95}
    assert info["model"] == "tiny" and info["max_model_len"] == 512
    assert 'fetch("/info")' in page and "t.example" in page and 'value="0.7"' not in page


def test_serve_command_reads_the_run_record(tmp_path, tok, monkeypatch):
    """`nanoseek serve --ckpt RUN` hands the app what RUN/run.json recorded, with an example in that format."""
    import uvicorn

    from nanoseek.stages import serve
    from nanoseek.checkpoint import save_model

    tok.save(tmp_path / "tokenizer.json")
    save_model(scripted_model(tok), tmp_path / "rl" / "checkpoints" / "step_000001",
               tokenizer_file=tmp_path / "tokenizer.json")
    (tmp_path / "rl" / "run.json").write_text(json.dumps({"command": "grpo", "task": "chain_sum",
                                                           "task_args": TRAINED["task_args"]}))
    seen = []
    monkeypatch.setattr(serve, "create_app", lambda *args, **kw: seen.append(args[4:] or kw["trained_on"]))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    serve.run(serve.ServeConfig(ckpt=str(tmp_path / "rl"), port=0, threads=1, precision="fp32"))
    (about,) = seen
    about = about[0] if isinstance(about, tuple) else about
    assert about["task"] == "chain_sum" and about["task_args"] == TRAINED["task_args"]
    assert about["example"].startswith("State the final answer to the following arithmetic problem: ")
    assert len(about["example"].split(":")[1].replace("-", "+").split("+")) == 4
