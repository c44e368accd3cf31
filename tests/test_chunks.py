"""The plain-text shortcut: whatever it decodes, the full JSON decoder would decode the same."""

from __future__ import annotations

from typing import Any

import ujson
from hypothesis import given, settings
from hypothesis import strategies as st

from orp_proxy.protocol.chunks import PlainText
from orp_proxy.protocol.sse_lines import SSELineBuffer
from tests.test_transcoder import make, run

VLLM = (b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"m","choices":[{"index":0,"delta":{"content":%s},"logprobs":null,'
        b'"finish_reason":null}]}')
LLAMA_CPP = (b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":%s}}],'
             b'"created":1700000000,"id":"chatcmpl-x","model":"m","system_fingerprint":"b1",'
             b'"object":"chat.completion.chunk"}')
SGLANG = (b'{"id":"a","object":"chat.completion.chunk","created":1,"model":"m","choices":'
          b'[{"index":0,"delta":{"role":null,"content":%s,"reasoning_content":null,'
          b'"tool_calls":null},"logprobs":null,"finish_reason":null,"matched_stop":null}],'
          b'"usage":null}')


def jstr(text: str, ascii_only: bool = False) -> bytes:
    """`text` as a JSON string; a lone surrogate can only come escaped."""
    try:
        return ujson.dumps(text, ensure_ascii=ascii_only, escape_forward_slashes=False).encode()
    except UnicodeEncodeError:
        return ujson.dumps(text, ensure_ascii=True, escape_forward_slashes=False).encode()


def taught(shape: bytes, first: str = "Hello") -> PlainText:
    plain = PlainText()
    payload = shape % jstr(first)
    plain.learn(payload, ujson.loads(payload))
    assert plain.text(payload) == first
    return plain


def full(payload: bytes) -> Any:
    return ujson.loads(payload)["choices"][0]["delta"]["content"]


TRICKY = ["", " w1", "caf\u00e9 \U0001f600", 'say "hi"', "back\\slash", "tab\tnew\nline",
          "\u2028", "a/b", "\\", '"', "\\\"", "</script>", "\x00\x1f", "\ud800"]


def test_each_server_shape_is_learnt_and_decodes_like_the_full_decoder() -> None:
    for shape in (VLLM, LLAMA_CPP, SGLANG):
        plain = taught(shape)
        for text in TRICKY:
            for ascii_only in (False, True):
                payload = shape % jstr(text, ascii_only)
                got = plain.text(payload)
                assert got == full(payload), (shape, text)


def test_raw_control_characters_and_invalid_utf8() -> None:
    plain = taught(VLLM)
    assert plain.text(VLLM % b'"a\tb"') == "a\tb"  # the JSON decoder accepts them too
    assert plain.text(VLLM % b'"a\xffb"') is None  # left to the full decoder, which refuses


def test_anything_but_the_text_differing_misses() -> None:
    plain = taught(VLLM)
    misses = [
        VLLM.replace(b'"finish_reason":null', b'"finish_reason":"stop"') % b'"x"',
        VLLM.replace(b'"chatcmpl-1"', b'"chatcmpl-2"') % b'"x"',
        VLLM.replace(b"}]}", b'}],"usage":{"prompt_tokens":1}}') % b'"x"',
        VLLM.replace(b'"logprobs":null', b'"logprobs":{"content":[]}') % b'"x"',
        VLLM % b'"a","tool_calls":[{"index":0}],"content":"b"',  # unescaped quotes
        VLLM % b'"a\\\\","refusal":"no"',  # an escaped backslash, then the string ends
        VLLM % b'"a\\"',  # cut inside an escape
        VLLM % b'null',
        b"[DONE]",
        b"",
    ]
    for payload in misses:
        assert plain.text(payload) is None, payload


def test_chunks_that_are_not_plain_text_teach_nothing() -> None:
    not_plain = [
        VLLM.replace(b'"finish_reason":null', b'"finish_reason":"stop"') % b'"x"',
        VLLM.replace(b'"logprobs":null', b'"logprobs":{"content":[{"token":"x"}]}') % b'"x"',
        VLLM.replace(b'{"content":', b'{"reasoning_content":"r","content":') % b'"x"',
        VLLM.replace(b'"index":0', b'"index":1') % b'"x"',
        VLLM.replace(b'"created"', b'"service_tier":"default","created"') % b'"x"',
        VLLM.replace(b"}]}", b'}],"usage":{"prompt_tokens":1}}') % b'"x"',
        VLLM % b'""',
        VLLM % b'"say \\"hi\\""',  # escaped: a later chunk teaches
        VLLM % b'"\\u0078"',
        # Another `content` with the same text: which one is the answer is not provable.
        VLLM.replace(b'"model":"m"', b'"content":"x","model":"m"') % b'"x"',
        b'{"choices":[{"delta":{"content":"x"}},{"index":1,"delta":{"content":"y"}}]}',
    ]
    for payload in not_plain:
        plain = PlainText()
        plain.learn(payload, ujson.loads(payload))
        assert plain.text(payload) is None, payload
        assert plain.text(VLLM % b'"x"') is None


def test_the_hole_must_be_the_delta_text_the_decoder_reads() -> None:
    # The delta's text arrives escaped, another key carries the same text unescaped: the only
    # literal occurrence is not the answer, and the probe refuses it.
    payload = (b'{"meta":{"content":"x"},"choices":[{"index":0,"delta":'
               b'{"content":"\\u0078"}}]}')
    plain = PlainText()
    plain.learn(payload, ujson.loads(payload))
    assert plain.text(b'{"meta":{"content":"y"},"choices":[{"index":0,"delta":'
                      b'{"content":"\\u0078"}}]}') is None


def test_an_upstream_whose_chunks_always_vary_stops_being_learnt() -> None:
    plain = PlainText()
    for n in range(10):
        payload = b'{"choices":[{"index":0,"delta":{"content":"w"}}],"nonce":"%d"}' % n
        assert plain.text(payload) is None
        plain.learn(payload, ujson.loads(payload))
    assert not plain._learning
    # One that matches keeps learning alive.
    plain = taught(VLLM)
    assert plain.text(VLLM % b'"y"') == "y"
    other = LLAMA_CPP % b'"z"'
    plain.learn(other, ujson.loads(other))
    assert plain.text(LLAMA_CPP % b'"q"') == "q" and plain._learning


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=12), min_size=1, max_size=12),
       st.sampled_from([VLLM, LLAMA_CPP, SGLANG]), st.booleans())
def test_any_texts_decode_as_the_full_decoder(texts: list[str], shape: bytes,
                                              ascii_only: bool) -> None:
    plain = PlainText()
    for text in texts:
        payload = shape % jstr(text, ascii_only)
        got = plain.text(payload)
        if got is None:
            plain.learn(payload, ujson.loads(payload))
        else:
            assert got == full(payload)


def test_the_transcoder_gives_the_same_events_either_way() -> None:
    texts = ["Hel", "lo", "", ' "wo"', "rld\n", "\U0001f600"]
    payloads = [VLLM % jstr(t) for t in texts]
    dicts = [ujson.loads(p) for p in payloads]
    lines = SSELineBuffer()
    plain = PlainText()
    mixed: list[Any] = []
    for payload in lines.feed(b"".join(b"data: " + p + b"\n\n" for p in payloads)):
        text = plain.text(payload)
        if text is None:
            chunk = ujson.loads(payload)
            plain.learn(payload, chunk)
            mixed.append(chunk)
        else:
            mixed.append((text,))
    assert any(type(c) is tuple for c in mixed)
    assert run(mixed, make()) == run(dicts, make())
