#!/usr/bin/env python3
"""hm serve under load (docs/SERVER.md): requests/s and output tokens/s at 1, 4 and 16 concurrent
clients, and what the prefix cache saves on a shared 512-token system prompt (time to first
token and tokens computed, from /metrics). Starts its own server; standard library only.

    python3 bench/serve_bench.py --hm build/hm [--model DIR] [--json out.json]
"""
import argparse
import http.client
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time


class Server:
    extra = []  # --serve-args, on every server

    def __init__(self, hm, model, *flags):
        self.p = subprocess.Popen([hm, "serve", "-m", model, "--port", "0", *flags, *Server.extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        m = re.search(r":(\d+)$", line.strip())
        if not m:
            raise SystemExit("hm serve did not start: " + line + self.p.stderr.read())
        self.port = int(m.group(1))

    def post(self, path, body, stream=False):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}: {r.read()[:300]!r}")
        if not stream:
            out = json.loads(r.read())
            c.close()
            return out
        return c, r

    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        return {k: float(v) for k, v in re.findall(r"^(hm_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=60)


def ttft(srv, body):
    """Seconds from sending a streaming request to its first content chunk; and the total."""
    t0 = time.perf_counter()
    c, r = srv.post("/v1/chat/completions", dict(body, stream=True), stream=True)
    first = None
    for raw in r:
        line = raw.decode().strip()
        if line.startswith("data: {") and first is None and '"content":"' in line and '"role"' not in line:
            first = time.perf_counter() - t0
        if line == "data: [DONE]":
            break
    c.close()
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


def load(srv, clients, per_client, max_tokens):
    results, errors = [], []

    def client(i):
        for k in range(per_client):
            body = {"prompt": f"Client {i} request {k}: the quick brown fox jumps over the lazy dog. " * 2,
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            try:
                out = srv.post("/v1/completions", body)
                results.append((time.perf_counter() - t0, out["usage"]["completion_tokens"]))
            except Exception as e:  # counted, reported
                errors.append(str(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    toks = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "failed": len(errors), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 2), "output_tokens_per_s": round(toks / wall, 1),
            "latency_p50_s": round(statistics.median(t for t, _ in results), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hm", default="build/hm")
    ap.add_argument("--model", help="model folder (default: hm init --preset demo in a temp dir)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--serve-args", default="", help="more hm serve flags, e.g. '--device cuda' or '-t 2'")
    a = ap.parse_args()
    Server.extra = shlex.split(a.serve_args)
    tmp = tempfile.TemporaryDirectory()
    model = a.model
    if not model:
        model = os.path.join(tmp.name, "demo")
        subprocess.run([a.hm, "init", "--preset", "demo", "--out", model], check=True, stdout=subprocess.DEVNULL)
    out = {"model": model, "cores": len(os.sched_getaffinity(0)), "serve_args": a.serve_args,
           "loadavg": os.getloadavg()[0], "load": []}

    srv = Server(a.hm, model, "--slots", "16", "--ctx", "1024")
    try:
        for clients in (1, 4, 16):
            r = load(srv, clients, max(1, a.requests // clients), a.max_tokens)
            out["load"].append(r)
            print(json.dumps(r), flush=True)
    finally:
        srv.stop()

    # The prefix cache: one 512-token system prompt (the byte tokenizer: 1 token per byte), then
    # requests that share it and differ after it.
    system = ("You are a helpful assistant for a hybrid Mamba model. " * 10)[:512 - len("<|system|>\n") - 1]
    def body(k):
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {k}?"}],
                "max_tokens": 8, "temperature": 0}
    pc = {}
    for name, flags in (("cache", []), ("no_cache", ["--cache-mb", "0"])):
        srv = Server(a.hm, model, "--slots", "4", "--ctx", "1024", *flags)
        try:
            m0 = srv.metrics()
            first, _ = ttft(srv, body(0))
            m1 = srv.metrics()
            later = [ttft(srv, body(k))[0] for k in range(1, 6)]
            m2 = srv.metrics()
            pc[name] = {"ttft_first_s": round(first, 4), "ttft_next_median_s": round(statistics.median(later), 4),
                        "computed_first": m1["hm_computed_tokens_total"] - m0["hm_computed_tokens_total"],
                        "computed_next_mean": (m2["hm_computed_tokens_total"] - m1["hm_computed_tokens_total"]) / 5,
                        "tokens_saved": m2.get("hm_prefix_cache_tokens_saved_total", 0)}
        finally:
            srv.stop()
        print(name, json.dumps(pc[name]), flush=True)
    pc["ttft_speedup_hit_vs_miss"] = round(pc["no_cache"]["ttft_next_median_s"] / pc["cache"]["ttft_next_median_s"], 2)
    out["prefix_cache_512"] = pc
    print(json.dumps(pc, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
