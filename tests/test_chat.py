"""The terminal chat (`nanoseek chat`): the shared R1 template, old turns dropped to fit the context, Ctrl-C
stopping a reply without losing the conversation, and impossible settings refused before the first turn."""

import pytest

from .live_server import ANSWER, CONTENT, scripted_model, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _chat_context(tok, turns: int) -> int:
    """The context in which `turns` scripted exchanges fit but one more question does not."""
    from nanoseek.template import conversation

    msgs = []
    for i in range(turns):
        msgs += [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": CONTENT}]
    ids = tok.encode(conversation(msgs + [{"role": "user", "content": "once more"}]))
    return len(ids) + 20 + 2 - 1  # max_new_tokens 20, the 2 spare positions: one token short


def test_terminal_chat_uses_the_shared_template_and_drops_old_turns(tok, capsys):
    from nanoseek.chat import chat
    from nanoseek.engine import SamplingParams

    model = scripted_model(tok, max_seq_len=_chat_context(tok, 2))  # the third question must drop a turn
    lines = iter(["hello there", "hello there", "once more", "/reset", "hello there", "/exit"])
    chat(model, tok, SamplingParams(max_new_tokens=20, temperature=0), read=lambda prompt: next(lines))
    out = capsys.readouterr()
    replies = [line for line in out.out.split("assistant> ") if line]
    assert len(replies) == 4 and all(r.strip() == "<think>" + ANSWER for r in replies)
    assert out.err.count("older conversation dropped") == 1 and "conversation cleared" in out.err


def test_terminal_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(tok, capsys, monkeypatch):
    """Ctrl-C mid-reply stops it and forgets that question only; Ctrl-C at the prompt only clears the line;
    /help and unknown commands answer on stderr; the prompts sent show exactly the turns that were kept."""
    from nanoseek import chat as chat_module
    from nanoseek.engine import Engine, SamplingParams

    model = scripted_model(tok)
    seen, real = [], Engine.generate
    interrupt = iter([False, True, False])  # the second question is interrupted while its reply streams

    def generate(self, prompts, params, speculative=False, on_token=None, **kw):
        seen.append(tok.decode(prompts[0]))
        stop_now = next(interrupt)

        def tap(row, token):
            on_token(row, token)
            if stop_now:
                raise KeyboardInterrupt
        return real(self, prompts, params, speculative=speculative, on_token=tap, **kw)

    monkeypatch.setattr(Engine, "generate", generate)
    script = iter(["hello there", KeyboardInterrupt, "/help", "/nope", "and again", "once more", "/exit"])

    def read(prompt):
        x = next(script)
        if x is KeyboardInterrupt:
            raise KeyboardInterrupt
        return x

    chat_module.chat(model, tok, SamplingParams(max_new_tokens=20, temperature=0), read=read)
    err = capsys.readouterr().err
    assert "(Ctrl-D or /exit leaves)" in err and "/reset" in err and "unknown command /nope" in err
    assert "reply stopped" in err and "Traceback" not in err
    assert "and again" in seen[1] and "and again" not in seen[2]  # the stopped question is forgotten
    assert seen[2].count("User: ") == 2 and seen[2].count(CONTENT) == 1  # hello there + its answer, once more


def test_terminal_chat_rejects_impossible_settings_before_the_first_turn(tok):
    from nanoseek.chat import chat
    from nanoseek.engine import SamplingParams

    model = scripted_model(tok, max_seq_len=64)
    asked = []
    with pytest.raises(ValueError, match="--max-new-tokens 60 leaves no room"):
        chat(model, tok, SamplingParams(max_new_tokens=60), read=lambda p: asked.append(p) or "/exit")
    assert not asked
