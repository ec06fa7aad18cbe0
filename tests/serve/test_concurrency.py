"""Many clients at once, clients that leave, and a queue that is full or too slow."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from tests.serve.conftest import MODEL, chat_ids

CLIENTS = 20


def ask(url: str, i: int):
    """Client ``i``: completions or chat, streamed or not, each with its own prompt and seed."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = f"client {i} says: the fox" if i % 2 else f"experts {i}"
    kwargs = dict(model=MODEL, max_tokens=8 + i, temperature=0.9, seed=100 + i)
    stream = i % 4 in (2, 3)
    if i % 4 in (0, 2):
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **kwargs))
        return client.completions.create(prompt=prompt, **kwargs).choices[0].text
    messages = [{"role": "user", "content": prompt}]
    if stream:
        chunks = client.chat.completions.create(messages=messages, stream=True, **kwargs)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(messages=messages, **kwargs).choices[0].message.content


def expected(i: int, tokenizer, reference) -> str:
    prompt = f"client {i} says: the fox" if i % 2 else f"experts {i}"
    ids = tokenizer.encode(prompt) if i % 4 in (0, 2) else chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    return reference(ids, 8 + i, 0.9, 100 + i).text


def test_twenty_concurrent_clients_get_their_own_answers(server, tokenizer, reference):
    start = threading.Barrier(CLIENTS)

    def run(i):
        start.wait()
        return ask(server.url, i)

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(run, range(CLIENTS)))
    wanted = [expected(i, tokenizer, reference) for i in range(CLIENTS)]
    assert len(set(wanted)) == CLIENTS, "the test prompts should give distinct answers"
    for i, (got, want) in enumerate(zip(answers, wanted)):
        assert got == want, f"client {i} got another answer"


def wait_until_idle(url: str, limit_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        health = httpx.get(f"{url}/health").json()
        if not health["busy"] and health["queued"] == 0:
            return time.perf_counter() - started
        time.sleep(0.01)
    raise AssertionError(f"the model was still busy {limit_s} s later")


def cancelled_count(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('dymoe_generations_total{finish_reason="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def test_disconnect_mid_stream_frees_the_model(slow_server):
    url = slow_server.url
    wait_until_idle(url, 10)
    before = cancelled_count(url)
    body = {"model": MODEL, "prompt": "the fox", "max_tokens": 400, "temperature": 0, "stream": True}
    # 400 tokens at SLOW_DECODE_S each would hold the model about 4 s without the cancellation
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
        data = 0
        for line in r.iter_lines():
            data += line.startswith("data: ")
            if data == 5:
                assert httpx.get(f"{url}/health").json()["busy"]
                break  # leaving the line iterator closes the connection: the client is gone
    freed_after = wait_until_idle(url, 1.0)
    next_started = time.perf_counter()
    answer = httpx.post(f"{url}/v1/completions", json=body | {"stream": False, "max_tokens": 3}, timeout=5)
    assert answer.status_code == 200 and time.perf_counter() - next_started < 1.0
    assert cancelled_count(url) == before + 1
    assert freed_after < 1.0


def test_client_timeout_on_a_whole_answer_cancels_it(slow_server):
    url = slow_server.url
    wait_until_idle(url, 10)
    before = cancelled_count(url)
    body = {"model": MODEL, "prompt": "the fox", "max_tokens": 400, "temperature": 0}
    try:
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        raise AssertionError("the 4 s generation answered within 0.3 s")
    except httpx.TimeoutException:
        pass
    assert wait_until_idle(url, 1.0) < 1.0
    assert cancelled_count(url) == before + 1


def test_full_queue_and_queue_timeout_are_503_with_retry_after(slow_server):
    """max_queue=1, queue_timeout_s=0.5: one runs, one waits (then times out), a third is refused at once."""
    url = slow_server.url
    wait_until_idle(url, 10)
    long = {"model": MODEL, "prompt": "the fox", "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=long) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # keep it: a dropped line iterator closes the connection
        next(lines)
        results = {}

        def waiter():
            results["waiting"] = httpx.post(f"{url}/v1/completions", json=long | {"stream": False}, timeout=10)

        thread = threading.Thread(target=waiter)
        thread.start()
        deadline = time.monotonic() + 2
        while httpx.get(f"{url}/health").json()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(f"{url}/v1/completions", json=long, timeout=10)
        thread.join()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    waited = results["waiting"]
    assert waited.status_code == 503, waited.text
    assert waited.json()["error"]["code"] == "queue_timeout" and "waited 0.5 s" in waited.json()["error"]["message"]
    assert int(waited.headers["retry-after"]) >= 1
    wait_until_idle(url, 1.0)
    assert httpx.post(f"{url}/v1/completions", json=long | {"stream": False, "max_tokens": 2}).status_code == 200



def answered(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith('dymoe_http_requests_total{route="/v1/c'))


def test_client_that_leaves_while_queued_is_dropped_and_its_handler_ends(slow_server):
    url = slow_server.url
    wait_until_idle(url, 10)
    long = {"model": MODEL, "prompt": "the fox", "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=long) as running:
        lines = running.iter_lines()  # keep it: a dropped line iterator closes the connection
        next(lines)
        before = answered(url)
        try:
            httpx.post(f"{url}/v1/completions", json=long | {"stream": False}, timeout=0.2)
            raise AssertionError("a queued request was answered while the model was busy")
        except httpx.TimeoutException:
            pass
        deadline = time.monotonic() + 1.0
        while answered(url) < before + 1:  # the queued request's handler has finished
            assert time.monotonic() < deadline, "the handler of a client that left is still waiting"
            time.sleep(0.01)
        health = httpx.get(f"{url}/health").json()
        assert health["queued"] == 0 and health["busy"]
