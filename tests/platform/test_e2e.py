"""End to end: `ember up` as a real process tree (Redis, gateway, 2 workers), driven with the
official openai client. Covers cold/warm headers, streaming, usage, seeds, scale to zero and a
cold start from the DRAM tier, and a clean shutdown without orphans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.platform.redis_server import free_port

pytestmark = pytest.mark.slow
ADMIN = "e2e-admin-key-0123456789"


class Up:
    def __init__(self, proc: subprocess.Popen[str], url: str, data_dir: Path, lines: list[str]) -> None:
        self.proc, self.url, self.data_dir, self.lines = proc, url, data_dir, lines


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    data_dir = tmp_path_factory.mktemp("up") / "data"
    port = free_port()
    env = {**os.environ, "EMBER_ADMIN_KEY": ADMIN, "EMBER_AUTOSCALER_INTERVAL_S": "0.3",
           "EMBER_HEARTBEAT_INTERVAL_S": "0.3", "EMBER_DRAM_CAPACITY_BYTES": str(128 << 20), "PYTHONUNBUFFERED": "1"}
    env.pop("EMBER_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "ember", "up", "--port", str(port), "--workers", "2",
                             "--data-dir", str(data_dir), "--simulated-gpus", "2", "--energy-mode", "actuate"],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("ready: "):
            break
    if not lines or not lines[-1].startswith("ready: "):
        proc.kill()
        logs = "\n".join(p.read_text()[-3000:] for p in (data_dir / "logs").glob("*.log"))
        pytest.fail("ember up did not become ready:\n" + "\n".join(lines) + "\n" + logs)
    assert lines[-1] == f"ready: http://127.0.0.1:{port}"
    yield Up(proc, f"http://127.0.0.1:{port}", data_dir, lines)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _client(up: Up):  # -> openai.OpenAI
    from openai import OpenAI

    return OpenAI(base_url=f"{up.url}/v1", api_key=ADMIN, max_retries=0, timeout=120)


def test_cold_then_warm_with_openai_client(up: Up) -> None:
    assert (up.data_dir / "admin_key").read_text().strip() == ADMIN
    assert any("admin key:" in line for line in up.lines)
    client = _client(up)
    assert "tiny" in [m.id for m in client.models.list().data]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    assert raw.headers["x-ember-cold-start"] == "true"
    assert raw.headers["x-ember-load-tier"] in ("remote", "ssd", "dram")
    assert raw.headers["x-ember-worker"].startswith("node-")
    assert float(raw.headers["x-ember-startup-ms"]) > 0
    first = raw.parse()
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens > 0 and first.usage.total_tokens == first.usage.prompt_tokens + \
        first.usage.completion_tokens
    raw2 = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    assert raw2.headers["x-ember-cold-start"] == "false"
    assert raw2.headers["x-ember-load-tier"] == "warm"
    assert raw2.parse().choices[0].message.content == first.choices[0].message.content  # greedy: same text


def test_console_after_up_shows_the_demo_function_and_the_nodes(up: Up, tmp_path: Path) -> None:
    """What a newcomer sees after `make up`: /console, signed in with the admin key (headless Chromium)."""
    from tests.platform.operators.browser import assert_not_blank, chromium, sign_in, text, wait

    with chromium(tmp_path / "profile") as browser:
        sign_in(browser, up.url, (up.data_dir / "admin_key").read_text().strip())
        row = 'tr[data-function="tiny"]'
        wait(browser, lambda d: "ready" in text(d, f"{row} td.instances") and "ms" in text(d, row))
        for node in ("node-0", "node-1"):
            wait(browser, lambda d, node=node: "cpu:0" in text(d, f'[data-node="{node}"]'))
        assert "tiny" in text(browser, ".nodes")  # the instance on its device, the checkpoint in a tier
        shot = tmp_path / "console-after-up.png"
        browser.save_screenshot(str(shot))
    assert_not_blank(shot)
    if os.environ.get("EMBER_SCREENSHOT_DIR"):  # to refresh the examples in docs/
        shutil.copyfile(shot, Path(os.environ["EMBER_SCREENSHOT_DIR"]) / "console.png")


def test_streaming_chat_and_completions_with_usage_and_seed(up: Up) -> None:
    client = _client(up)
    texts = []
    for _ in range(2):
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
            temperature=0.9, seed=7, stream=True, stream_options={"include_usage": True})
        parts, usage, finish = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        assert usage is not None and usage.completion_tokens >= 1 and finish in ("stop", "length")
        texts.append("".join(parts))
    assert texts[0] == texts[1]  # same seed, same text

    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, seed=3, temperature=1.0)
    again = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, seed=3, temperature=1.0)
    assert full.choices[0].text == again.choices[0].text
    assert full.usage.completion_tokens == again.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, seed=3, temperature=1.0, stream=True) if c.choices)
    assert streamed == full.choices[0].text

    stopped = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, seed=3,
                                        temperature=1.0, stop=[full.choices[0].text[2:4]] if len(
                                            full.choices[0].text) >= 4 else None)
    if len(full.choices[0].text) >= 4:
        assert len(stopped.choices[0].text) < len(full.choices[0].text)
        assert stopped.choices[0].finish_reason == "stop"


def test_scale_to_zero_then_cold_start_from_dram(up: Up) -> None:
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.put(f"{up.url}/v1/functions/brief", headers=h, timeout=60, json={
        "checkpoint": "tiny", "scaling": {"min_instances": 0, "keep_alive_s": 1}})
    assert r.status_code == 201, r.text
    assert r.json()["nbytes"] > 0  # a worker resolved the checkpoint's size
    chat = {"model": "brief", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r1 = httpx.post(f"{up.url}/v1/chat/completions", headers=h, json=chat, timeout=120)
    assert r1.status_code == 200 and r1.headers["x-ember-cold-start"] == "true"
    worker = r1.headers["x-ember-worker"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not httpx.get(f"{up.url}/v1/functions/brief", headers=h).json()["instances"]:
            break
        time.sleep(0.3)
    assert httpx.get(f"{up.url}/v1/functions/brief", headers=h).json()["instances"] == []
    r2 = httpx.post(f"{up.url}/v1/chat/completions", headers=h, json=chat, timeout=120)
    assert r2.status_code == 200
    assert r2.headers["x-ember-cold-start"] == "true"
    assert r2.headers["x-ember-load-tier"] == "dram"
    assert r2.headers["x-ember-worker"] == worker  # locality: the node that holds it in DRAM
    metrics = httpx.get(f"{up.url}/metrics").text
    assert 'ember_cold_starts_total{tier="dram"}' in metrics


def test_cli_client_verbs(up: Up) -> None:
    from typer.testing import CliRunner

    from ember.cli import app

    runner = CliRunner()
    env = {"EMBER_URL": up.url, "EMBER_API_KEY": ADMIN}
    r = runner.invoke(app, ["deploy", "cli-fn", "--checkpoint", "tiny", "--keep-alive-s", "30"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["scaling"]["keep_alive_s"] == 30
    r = runner.invoke(app, ["ls"], env=env)
    assert r.exit_code == 0 and "cli-fn\ttiny" in r.stdout
    r = runner.invoke(app, ["invoke", "cli-fn", "Hello", "--max-tokens", "4"], env=env)
    assert r.exit_code == 0, r.output
    assert "x-ember-cold-start=true" in r.stderr
    r = runner.invoke(app, ["invoke", "cli-fn", "Hello", "--max-tokens", "4", "--stream"], env=env)
    assert r.exit_code == 0 and "x-ember-cold-start=false" in r.stderr
    r = runner.invoke(app, ["keys", "create", "--role", "invoker", "--name", "cli"], env=env)
    assert r.exit_code == 0 and json.loads(r.stdout)["role"] == "invoker"
    r = runner.invoke(app, ["invoke", "nope", "Hello"], env=env)
    assert r.exit_code == 1 and "404" in r.stderr
    r = runner.invoke(app, ["rm", "cli-fn"], env=env)
    assert r.exit_code == 0
    assert "cli-fn" not in runner.invoke(app, ["ls"], env=env).stdout


def test_private_redis_refuses_clients_without_its_password(up: Up) -> None:
    """`ember up` starts its Redis with a generated password kept in the data dir: a key written
    straight into Redis by anyone who merely reaches the port is no longer possible."""
    import redis

    line = next(ln for ln in up.lines if ln.startswith("redis: "))
    url = line.split()[1]
    assert "@" not in url  # the password is not printed
    password = (up.data_dir / "redis_password").read_text().strip()
    assert (up.data_dir / "redis_password").stat().st_mode & 0o077 == 0
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url, socket_timeout=5).hset("ember:apikey:forged", "role", "admin")
    authed = redis.Redis.from_url(url.replace("redis://", f"redis://:{password}@"), socket_timeout=5)
    assert authed.ping() and authed.hlen("ember:functions") >= 1  # the gateway and workers use it
    authed.close()


def test_workers_leave_a_core_to_the_gateway(up: Up) -> None:
    """`ember up` runs the gateway and Redis beside its workers: each worker's torch gets the CPUs
    less one, shared among the workers (torch's own default, a thread per core in every worker,
    took the gateway's CPU: its p50 at 400 warm req/s on 2 cores was 5-7 ms against 2.4 ms)."""
    import redis

    from ember.platform.state import Keys
    from ember.platform.supervisor import torch_threads_beside

    line = next(ln for ln in up.lines if ln.startswith("redis: "))
    password = (up.data_dir / "redis_password").read_text().strip()
    r = redis.Redis.from_url(line.split()[1].replace("redis://", f"redis://:{password}@"), decode_responses=True)
    urls = [r.hget(Keys.node(n), "url") for n in ("node-0", "node-1")]
    r.close()
    token = (up.data_dir / "cluster_token").read_text().strip()
    expected = torch_threads_beside(2)
    for url in urls:
        text = httpx.get(f"{url}/metrics", headers={"x-ember-cluster-token": token}, timeout=10).text
        (found,) = [ln for ln in text.splitlines() if ln.startswith("ember_worker_torch_threads ")]
        assert int(float(found.split()[1])) == expected, (url, found)
    assert torch_threads_beside(1, cpus=2) == 1 and torch_threads_beside(2, cpus=16) == 7
    assert torch_threads_beside(4, cpus=2) == 1


def test_locust_load_run_is_bounded_and_error_free(up: Up, tmp_path: Path) -> None:
    out = tmp_path / "load"
    env = {**os.environ, "EMBER_API_KEY": ADMIN, "EMBER_LOAD_MAX_TOKENS": "4"}
    proc = subprocess.run([sys.executable, "loadtests/run.py", "--url", up.url, "--users", "4", "--duration-s", "5",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "steady" and summary["requests"] > 0 and summary["failures"] == 0
    assert summary["warm"]["count"] > 0 and summary["e2e_s"]["p50"] > 0
    assert (out / "ttft.png").stat().st_size > 0 and (out / "locust.html").exists()
    # what the scenario deployed on the given platform is gone again
    functions = httpx.get(f"{up.url}/v1/functions", headers={"Authorization": f"Bearer {ADMIN}"}).json()["functions"]
    assert not [f["name"] for f in functions if f["name"].startswith("lt-")]


def test_energy_status_shows_the_emulated_gpus_of_ember_up(up: Up) -> None:
    """`ember up --simulated-gpus 2 --energy-mode actuate` reached both workers; after the requests
    above, `ember energy status` shows power, energy and J/token that are not zero."""
    from typer.testing import CliRunner

    from ember.cli import app

    r = CliRunner().invoke(app, ["energy", "status", "--json"], env={"EMBER_URL": up.url, "EMBER_API_KEY": ADMIN})
    assert r.exit_code == 0, r.output
    devices = json.loads(r.stdout)["devices"]
    assert sorted((d["node"], d["device"]) for d in devices) == [
        (n, s) for n in ("node-0", "node-1") for s in ("sim:0", "sim:1")]
    assert all(d["mode"] == "actuate" and d["power_w"] > 0 and d["energy_j"] > 0 for d in devices)
    assert any((d["j_per_token"] or 0) > 0 for d in devices)
    # actuate mode journaled each GPU's original settings before changing them
    assert len(list(up.data_dir.glob("nodes/node-*/energy/original_settings.json"))) == 2


def test_sigterm_stops_every_child(up: Up) -> None:
    children = _descendants(up.proc.pid)
    assert len(children) >= 4  # redis, gateway, 2 workers
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(children):
        time.sleep(0.2)
    assert _alive(children) == set()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{up.url}/healthz", timeout=1)
    # every worker put its (emulated) GPUs back as it found them and dropped its journal
    assert list(up.data_dir.glob("nodes/node-*/energy/original_settings.json")) == []
