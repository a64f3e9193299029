#!/usr/bin/env python3
"""A bounded load test of hm serve (issue 16): C concurrent streaming clients send R greedy
requests, half sharing a long prefix (prefix-cache hits), half not; every response must arrive
whole (SSE ending in [DONE]) and equal the same request run alone. Standard library only.

    python3 bench/serve_load_test.py --hm build/hm [--model DIR] [--clients 64] [--requests 1000]

Exits 1 on any failed or differing request.
"""
import argparse
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time


def start(hm, model, flags):
    p = subprocess.Popen([hm, "serve", "-m", model, "--port", "0", *flags], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    m = re.search(r":(\d+)$", p.stdout.readline().strip())
    if not m:
        raise SystemExit("hm serve did not start: " + p.stderr.read())
    return p, int(m.group(1))


def stream(port, body):
    """The text of a streamed completion; raises on any protocol error."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    raw = r.read().decode()
    c.close()
    events = raw.split("\n\n")
    if events[-2:] != ["data: [DONE]", ""]:
        raise RuntimeError("stream did not end with [DONE]: " + raw[-100:])
    text, first = "", None
    for e in events[:-2]:
        if not e.startswith("data: "):
            raise RuntimeError("bad event: " + e[:100])
        ch = json.loads(e[6:])
        if "error" in ch:
            raise RuntimeError("error event: " + e[:200])
        text += ch["choices"][0]["text"]
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hm", default="build/hm")
    ap.add_argument("--model", help="default: hm init --preset tiny in a temp dir")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=40, help="distinct prompts (each run alone once)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--serve-args", default="--slots 16 --max-queue 128 --ctx 512 --cache-block 16")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model = a.model or os.path.join(tmp.name, "tiny")
    if not a.model:
        subprocess.run([a.hm, "init", "--preset", "tiny", "--out", model], check=True, stdout=subprocess.DEVNULL)
    shared = "A shared system prompt that many requests start with, long enough to span blocks. " * 3
    bodies = []
    for i in range(a.distinct):
        prompt = (shared if i % 2 == 0 else "") + f"request {i}: " + "xyz"[i % 3] * (i % 7)
        bodies.append({"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True})
    p, port = start(a.hm, model, a.serve_args.split())
    try:
        alone = [stream(port, b) for b in bodies]  # one at a time: the reference
        jobs = queue.Queue()
        for k in range(a.requests):
            jobs.put(k % a.distinct)
        failed, differ, done = [], [], [0]
        lock = threading.Lock()

        def client():
            while True:
                try:
                    i = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    t = stream(port, bodies[i])
                    with lock:
                        done[0] += 1
                        if t != alone[i]:
                            differ.append(i)
                except Exception as e:
                    with lock:
                        failed.append(str(e))

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        c = http.client.HTTPConnection("127.0.0.1", port)
        c.request("GET", "/metrics")
        metrics = dict(re.findall(r"^(hm_prefix_cache_[a-z_]+|hm_computed_tokens_total) ([0-9.e+-]+)$",
                                  c.getresponse().read().decode(), re.M))
    finally:
        p.terminate()
        rc = p.wait(timeout=60)
    out = {"clients": a.clients, "requests": a.requests, "ok": done[0], "failed": len(failed),
           "differing": len(differ), "wall_s": round(wall, 2), "requests_per_s": round(a.requests / wall, 1),
           "output_tokens_per_s": round(done[0] * a.max_tokens / wall, 1), "server_exit": rc, **metrics}
    print(json.dumps(out))
    if failed:
        print("first failure:", failed[0], file=sys.stderr)
    return 1 if failed or differ or rc != 143 else 0


if __name__ == "__main__":
    sys.exit(main())
