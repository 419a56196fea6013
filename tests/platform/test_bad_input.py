"""Bad input against a real gateway process: every body gets a clear 4xx in the OpenAI shape,
never a 500; unsupported OpenAI parameters are named; oversized chunked bodies get 413; the CLI
answers an I/O error with one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.platform.conftest import Proc, TierCluster, admin_headers, base_env, start_gateway


@pytest.fixture(scope="module")
def gateway(redis_server: str, tmp_path_factory: pytest.TempPathFactory):
    """One gateway for the module (these requests leave nothing behind in Redis)."""
    tmp = tmp_path_factory.mktemp("badinput")
    g = start_gateway(tmp, base_env(redis_server, f"file://{tmp / 'store'}"))
    yield g
    g.stop()


def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    return err


def test_bodies_that_used_to_give_500_get_400(tier_cluster: TierCluster) -> None:
    """Against a deployed function on a real worker: out-of-range seeds and lone surrogates are
    refused at the gateway with 400 (they were 500s from the worker), in-range ones still serve."""
    u, h = tier_cluster.gateway.url, {**admin_headers(), "content-type": "application/json"}
    r = httpx.put(f"{u}/v1/functions/badin", headers=admin_headers(), json={"checkpoint": "rlck"})
    assert r.status_code in (200, 201), r.text
    chat = '{"model": "badin", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]%s}'
    cases = {
        "seed": chat % ('"hi"', ', "seed": 18446744073709551616'),
        "negative seed": chat % ('"hi"', ', "seed": -9223372036854775809'),
        "lone surrogate": chat % ('"\\ud800"', ""),
        "surrogate in stop": chat % ('"hi"', ', "stop": ["\\udfff"]'),
        "surrogate prompt": '{"model": "badin", "max_tokens": 2, "prompt": "a\\ud800b"}',
    }
    for what, body in cases.items():
        route = "completions" if "prompt" in what else "chat/completions"
        r = httpx.post(f"{u}/v1/{route}", headers=h, content=body.encode(), timeout=120)
        err = _err(r, 400)
        assert err["code"] in ("invalid_seed", "invalid_unicode"), (what, err)
    ok = httpx.post(f"{u}/v1/chat/completions", headers=h, timeout=120,
                    content=(chat % ('"hi"', ', "seed": 18446744073709551615, "temperature": 1')).encode())
    assert ok.status_code == 200, ok.text


def test_unsupported_openai_parameters_are_named(gateway: Proc) -> None:
    u, h = gateway.url, admin_headers()
    base = {"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}
    for name, value in [("logprobs", True), ("top_logprobs", 3), ("tools", [{"type": "function"}]),
                        ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
                        ("frequency_penalty", 1.0), ("logit_bias", {"50256": -100}), ("tool_choice", "auto")]:
        err = _err(httpx.post(f"{u}/v1/chat/completions", headers=h, json={**base, name: value}), 400)
        assert err["code"] == "unsupported_parameter" and name in err["message"]
    image = {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
    err = _err(httpx.post(f"{u}/v1/chat/completions", headers=h, json={**base, "messages": [image]}), 400)
    assert "image_url" in err["message"]
    _err(httpx.post(f"{u}/v1/completions", headers=h, json={"model": "ghost", "prompt": "x", "best_of": 3}), 400)
    # completions' logprobs is a count: 0 still asks for the sampled tokens' log probabilities
    err = _err(httpx.post(f"{u}/v1/completions", headers=h, json={"model": "ghost", "prompt": "x", "logprobs": 0}), 400)
    assert err["code"] == "unsupported_parameter" and "logprobs" in err["message"]
    _err(httpx.post(f"{u}/v1/completions", headers=h, json={"model": "ghost", "prompt": "x", "logprobs": None}), 404)
    # neutral values are accepted (404: the function does not exist)
    neutral = {**base, "logprobs": False, "presence_penalty": 0, "tools": [], "response_format": {"type": "text"}}
    _err(httpx.post(f"{u}/v1/chat/completions", headers=h, json=neutral), 404)


def test_chunked_body_past_the_limit_gets_413(gateway: Proc) -> None:
    def body():
        yield b'{"model": "ghost", "prompt": "'
        for _ in range(10):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = httpx.post(f"{gateway.url}/v1/completions", headers=admin_headers(), content=body())
    _err(r, 413)
    small = httpx.post(f"{gateway.url}/v1/completions", headers={**admin_headers(), "content-type": "application/json"},
                       content=iter([b'{"model": "ghost",', b' "prompt": "x"}']))
    _err(small, 404)  # a chunked body under the limit is read as usual


def test_clients_that_leave_mid_body_cost_nothing(gateway: Proc) -> None:
    """The invocation routes read their body themselves (gateway/fast_path.py): a client that
    declares a length and goes away before sending it all, or sends a whole request and goes away
    before the answer, leaves no error, no 500 and no stuck connection behind."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(gateway.url)
    logged = len(gateway.log.read_bytes())
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {u.hostname}\r\ncontent-type: application/json\r\n"
            f"authorization: {admin_headers()['Authorization']}\r\n")
    whole = b'{"model": "ghost", "messages": [{"role": "user", "content": "Hi"}]}'
    for i in range(40):
        with socket.create_connection((u.hostname, u.port), timeout=5) as s:
            if i % 2:
                s.sendall((head + "content-length: 500\r\n\r\n").encode() + whole[:20])  # then gone
            else:
                s.sendall((head + f"content-length: {len(whole)}\r\n\r\n").encode() + whole)  # gone before the answer
    r = httpx.post(f"{gateway.url}/v1/chat/completions", headers=admin_headers(), timeout=10,
                   json={"model": "ghost", "messages": [{"role": "user", "content": "Hi"}]})
    _err(r, 404)
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'status="500"' not in metrics
    tail = gateway.log.read_bytes()[logged:].decode(errors="replace")
    assert "Traceback" not in tail and "ERROR" not in tail, tail[-3000:]


def test_cli_prints_one_line_for_io_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`ember checkpoint push` into a full store (a 512 KiB tmpfs in a private mount namespace: the
    tiny checkpoint is 737 KiB)."""
    store = tmp_path / "store"
    store.mkdir()
    cmd = f"mount -t tmpfs -o size=512k tmpfs {store} && exec {sys.executable} -m ember checkpoint push " \
          f"{tiny_model_dir} tiny --store file://{store}"
    if not shutil.which("unshare"):
        pytest.skip("needs unshare")
    r = subprocess.run(["unshare", "--mount", "--", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    if "mount:" in r.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error: ")
    assert "No space left on device" in lines[0]


def test_a_body_that_stalls_gets_a_408_and_holds_nothing(redis_url: str, tmp_path) -> None:  # noqa: ANN001
    """A client declares a 1 MiB body, sends all but its last byte and waits: before, the connection
    held the buffered body (no key checked yet) for as long as it stayed open, so a few thousand of
    them ran the gateway out of memory. Now a stall of EMBER_BODY_TIMEOUT_S in the body is a 408.
    A slow but moving body, and a long stream after a whole body, are unaffected."""
    import socket
    import time

    from tests.platform.conftest import base_env, start_gateway

    g = start_gateway(tmp_path, base_env(redis_url, f"file://{tmp_path / 'store'}", EMBER_BODY_TIMEOUT_S="1"))
    try:
        host, port = g.url.removeprefix("http://").split(":")
        for path in ("/v1/chat/completions", "/v1/functions/x"):
            s = socket.create_connection((host, int(port)), timeout=10)
            method = "POST" if "chat" in path else "PUT"
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 1048576\r\n\r\n".encode() + b"x" * (1048576 - 1))
            t0 = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
            s.close()
            assert answer.startswith(b"HTTP/1.1 408"), (path, answer[:200])
            assert 0.8 < time.monotonic() - t0 < 10
        # a body that keeps moving (a byte every 0.4 s) is read whole: 422 for its content, not 408
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer nope\r\nContent-Length: 6\r\n\r\n")
        for b in b'{"a":1':
            time.sleep(0.4)
            s.sendall(bytes([b]))
        answer = s.recv(65536)
        s.close()
        assert not answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert httpx.get(f"{g.url}/healthz").status_code == 200
    finally:
        g.stop()
