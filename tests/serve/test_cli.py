"""``dymoe serve`` as a user runs it: a real process on a loopback port, and the one-line error without the extra."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from dymoe.cli.main import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dymoe_serve_process_answers_and_stops(model_dir, tokenizer, reference):
    port = free_port()
    command = [sys.executable, "-m", "dymoe", "serve", "-m", str(model_dir), "--port", str(port), "--device", "cpu",
               "--no-progress", "--context-len", "256", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 60 s"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == model_dir.name
        out = client.completions.create(model=model_dir.name, prompt="the fox", max_tokens=6, temperature=0)
        assert out.choices[0].text == reference(tokenizer.encode("the fox"), 6).text
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode in (0, 130), err
    assert f"on http://127.0.0.1:{port}/v1" in err and "one generation at a time" in err


def test_taken_port_is_one_line(model_dir, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["serve", "-m", str(model_dir), "--port", str(port), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_without_the_extra_says_how_to_install_it(model_dir, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "fastapi" or m.startswith(("fastapi.", "dymoe.serve"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now fails as if it were not installed
    assert main(["serve", "-m", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'dymoe[serve]'" in err


@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--max-queue", "0"), ("--queue-timeout", "0")])
def test_bad_server_flags_are_named(model_dir, capsys, flag, value):
    assert main(["serve", "-m", str(model_dir), flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_core_import_does_not_pull_fastapi():
    code = "import sys, dymoe.cli.main, dymoe.engine.engine; assert 'fastapi' not in sys.modules, 'fastapi imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_listening_socket_is_tcp_so_responses_are_not_held_by_nagle(server):
    """asyncio sets TCP_NODELAY only on sockets whose proto is TCP; without it each answer waited ~44 ms."""
    from dymoe.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
    with httpx.Client(base_url=server.url) as http:
        times = []
        for _ in range(9):
            started = time.perf_counter()
            http.get("/health")
            times.append(time.perf_counter() - started)
    assert sorted(times)[4] < 0.02, f"median /health latency {sorted(times)[4] * 1000:.1f} ms"
