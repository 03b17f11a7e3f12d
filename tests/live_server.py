"""Fixtures for the server tests: a real tokenizer, a tiny model whose greedy continuations are scripted, and a
live `nanoseek serve` app on 127.0.0.1 (a free port) in a background thread.

The model is a real Transformer (tiny preset, random weights) whose embeddings dominate the residual stream and
whose output head maps chosen tokens to chosen successors, so greedy decoding follows known paths through the
real cache, attention and sampling code:
    <think> → ANSWER (" The cat sat</think><answer>42</answer>")   the chat template's reply
    " ping" → " pong" → " ping" → …                                 a loop that never ends by itself
Every other token has a near-uniform next-token distribution, so sampling there is genuinely random.
"""

from __future__ import annotations

import socket
import threading
import time

import torch

from nanoseek import Transformer, get_preset
from nanoseek.template import R1_PREAMBLE, THINK
from nanoseek.tokenizer import Tokenizer

ANSWER = " The cat sat</think><answer>42</answer>"
REASONING, CONTENT = "The cat sat", "42"
LOOP = (" ping", " pong")


def tokenizer() -> Tokenizer:
    texts = [R1_PREAMBLE, "User: hello there\nAssistant: <think>", ANSWER, " ping pong ping pong", "42 4 2",
             "the quick brown fox jumps over the lazy dog", "a b c d e f g h i j k"] * 30
    return Tokenizer.train(texts, 400)


def chain(tok: Tokenizer) -> list[int]:
    """The token path of the scripted reply: <think>, the answer's tokens, then eos. Its tokens are distinct."""
    ids = [tok.encode(THINK)[0], *tok.encode(ANSWER)]
    assert len(set(ids)) == len(ids), "the scripted reply must not repeat a token"
    return ids + [tok.eos_id]


def scripted_model(tok: Tokenizer, max_seq_len: int = 512) -> Transformer:
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=max_seq_len, original_seq_len=max_seq_len)
    model = Transformer(cfg).eval()
    path = chain(tok)
    ping, pong = tok.encode(LOOP[0])[0], tok.encode(LOOP[1])[0]
    edges = list(zip(path[:-1], path[1:])) + [(ping, pong), (pong, ping)]
    with torch.no_grad():
        model.init_weights(std=0.02)
        emb = torch.randn(cfg.vocab_size, cfg.dim)
        sources = sorted({a for a, _ in edges})
        q, _ = torch.linalg.qr(torch.randn(cfg.dim, len(sources)))  # orthonormal directions for the sources
        emb[sources] = q.T * cfg.dim ** 0.5
        model.embed.weight.copy_(emb)
        head = torch.randn(cfg.vocab_size, cfg.dim) * 0.01
        for a, b in edges:
            head[b] += 2.0 * emb[a] / emb[a].norm()  # after the final norm |h| ≈ sqrt(dim): logit ≈ 16
        model.head.weight.copy_(head)
    return model


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """`with LiveServer(model, tok, max_batch=8) as s:` serves on s.url until the block ends."""

    def __init__(self, model, tok, **config):
        import uvicorn

        from nanoseek.stages.serve import ServeConfig, create_app

        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = ServeConfig(ckpt="", port=self.port, **config)
        self.app = create_app(model, tok, cfg, name="tiny")
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        while not self.server.started:  # startup takes milliseconds; the thread dying would be a failure
            assert self.thread.is_alive(), "the server thread died during startup"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()

    @property
    def worker(self):
        return self.app.state.worker

    def wait_until(self, condition, what: str, limit: float = 60.0) -> None:
        """Poll the worker's status until condition(status) holds (limit only guards against a hang)."""
        deadline = time.monotonic() + limit
        while not condition(self.worker.status()):
            assert time.monotonic() < deadline, f"gave up waiting for {what}: {self.worker.status()}"
            time.sleep(0.01)
