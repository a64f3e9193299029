#!/usr/bin/env python3
"""The load test of hm serve (issue 16, docs/SERVING.md), all figures from one run:

1. Throughput and latency at 1, 8 and 64 concurrent streaming clients (greedy completions over
   `--distinct` prompts, half sharing a prefix): output tok/s, time to first token and
   inter-token latency (p50, p99). The 1-client level runs each prompt once, alone: every
   response at every level must equal that one, and every request must end in [DONE].
2. Time to first token for a 2,000-token shared prefix: a new prefix (miss), then the same prefix
   with another question (hit), for several prefixes; and the same requests on a server without
   the prefix cache.

    python3 bench/serve_load_test.py --hm build/hm [--model DIR] [--json out.json] [--markdown]

Standard library only. Exits 1 on any failed or differing request, or a server that does not exit
143 on SIGTERM.
"""
import argparse
import http.client
import json
import os
import platform
import queue
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time


class Server:
    def __init__(self, hm, model, flags):
        self.p = subprocess.Popen([hm, "serve", "-m", model, "--port", "0", *flags], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        m = re.search(r":(\d+)$", self.p.stdout.readline().strip())
        if not m:
            raise SystemExit("hm serve did not start: " + self.p.stderr.read())
        self.port = int(m.group(1))
        # The first forward pays for thread start-up and first-touch allocations: not measured.
        self.stream({"prompt": "warm-up", "max_tokens": 4, "temperature": 0, "ignore_eos": True})

    def post(self, path, body):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        out = json.loads(r.read())
        c.close()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}: {out}")
        return out

    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        return {k: float(v) for k, v in re.findall(r"^(hm_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}

    def stop(self):
        """SIGTERM; the exit code (143 when it drained and stopped as it should)."""
        self.p.terminate()
        return self.p.wait(timeout=60)

    def stream(self, body):
        """A streamed completion: its text, time to first token, the gaps between the chunks that
        carry text (inter-token latency), its usage. Raises on any protocol error."""
        t0 = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("POST", "/v1/completions",
                  json.dumps(dict(body, stream=True, stream_options={"include_usage": True})),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        text, stamps, usage, done = "", [], None, False
        for raw in r:
            line = raw.decode().rstrip("\n")
            if not line:
                continue
            if not line.startswith("data: ") or done:
                raise RuntimeError("bad event: " + line[:100])
            if line == "data: [DONE]":
                done = True
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError("error event: " + line[:200])
            if ch.get("usage"):
                usage = ch["usage"]
            if ch["choices"] and ch["choices"][0]["text"]:
                stamps.append(time.perf_counter())
                text += ch["choices"][0]["text"]
        c.close()
        if not done or usage is None or not stamps:
            raise RuntimeError(f"incomplete stream (done {done}, usage {usage}, {len(stamps)} text chunks)")
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"text": text, "ttft": stamps[0] - t0, "gaps": gaps, "usage": usage}


def pct(xs, p):
    """The p-th percentile (nearest rank), or None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def level(srv, bodies, clients, requests, reference):
    """`requests` requests (cycling over bodies) from `clients` threads at once."""
    jobs = queue.Queue()
    for k in range(requests):
        jobs.put(k % len(bodies))
    done, failed, differ = [], [], []
    lock = threading.Lock()

    def client():
        while True:
            try:
                k = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                r = srv.stream(bodies[k])
            except Exception as e:  # counted and reported
                with lock:
                    failed.append(str(e))
                continue
            with lock:
                done.append((k, r))
                if reference is not None and r["text"] != reference[k]:
                    differ.append(k)

    m0 = srv.metrics()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    m1 = srv.metrics()
    ttft = [r["ttft"] for _, r in done]
    gaps = [g for _, r in done for g in r["gaps"]]
    # Time per output token of each request after its first (the gaps' mean, per request): unlike
    # single gaps, not split by chunks that arrive together.
    tpot = [sum(r["gaps"]) / (r["usage"]["completion_tokens"] - 1) for _, r in done
            if r["usage"]["completion_tokens"] > 1]
    tokens = sum(r["usage"]["completion_tokens"] for _, r in done)
    out = {"clients": clients, "requests": requests, "ok": len(done), "failed": len(failed),
           "differing": len(differ), "wall_s": round(wall, 2), "output_tok_s": round(tokens / wall, 1),
           "ttft_p50_ms": round(1000 * pct(ttft, 50), 1), "ttft_p99_ms": round(1000 * pct(ttft, 99), 1),
           "itl_p50_ms": round(1000 * pct(gaps, 50), 2), "itl_p99_ms": round(1000 * pct(gaps, 99), 2),
           "tpot_p50_ms": round(1000 * pct(tpot, 50), 2), "tpot_p99_ms": round(1000 * pct(tpot, 99), 2),
           "tokens_per_text_chunk": round(tokens / max(1, sum(len(r["gaps"]) + 1 for _, r in done)), 3)}
    # Where the engine's time went (/metrics): the share of the wall time it was inside steps (near
    # 1: the server is the bottleneck; far below: the clients are), and how its steps split.
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in ("hm_step_seconds_total", "hm_step_forward_seconds_total",
                                                      "hm_step_cache_seconds_total", "hm_step_sample_seconds_total",
                                                      "hm_steps_total")}
    if d["hm_steps_total"] > 0:
        out["engine_busy"] = round(d["hm_step_seconds_total"] / wall, 3)
        out["step_ms"] = round(1000 * d["hm_step_seconds_total"] / d["hm_steps_total"], 3)
        for k, name in (("hm_step_forward_seconds_total", "forward_ms"), ("hm_step_cache_seconds_total", "cache_ms"),
                        ("hm_step_sample_seconds_total", "sample_ms")):
            out[name] = round(1000 * d[k] / d["hm_steps_total"], 3)
    if failed:
        out["first_failure"] = failed[0]
    return out, done


def prefix_ttft(srv, prefixes, questions, max_tokens):
    """For each prefix: a request with the first question, then one with the second. Times to
    first token, cached tokens (usage) and tokens the model computed (/metrics) of each."""
    rows = []
    for p in prefixes:
        for q in questions:
            m0 = srv.metrics()
            r = srv.stream({"prompt": p + q, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            m1 = srv.metrics()
            d = lambda k: m1.get(k, 0.0) - m0.get(k, 0.0)
            rows.append({"ttft": r["ttft"], "cached": r["usage"]["prompt_tokens_details"]["cached_tokens"],
                         "computed": d("hm_computed_tokens_total"), "prompt": r["usage"]["prompt_tokens"],
                         "text": r["text"],
                         # where the time went (engine counters over the request: its steps, their
                         # forwards and the prefix cache's checkpoints, and evictions it caused)
                         "steps": d("hm_steps_total"), "forward": d("hm_step_forward_seconds_total"),
                         "cache": d("hm_step_cache_seconds_total"), "evictions": d("hm_prefix_cache_evictions_total"),
                         # the server's own view of the first token (from its submit: the client's
                         # TTFT less this is HTTP, parsing and the client), its wait for a slot,
                         # and admission (cache restore, device sampler setup)
                         "server_ttft": d("hm_time_to_first_token_seconds_sum"),
                         "queue": d("hm_request_queue_seconds_sum"), "admit": d("hm_step_admit_seconds_total")})
    return rows[0::2], rows[1::2]  # first question of each prefix, second question of each


def cpu_name():
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
    return m.group(1) if m else platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hm", default="build/hm")
    ap.add_argument("--model", help="model folder (default: hm init --preset PRESET in a temp dir, random weights)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--config", help="a config.json for hm init instead of --preset (random bf16 weights)")
    ap.add_argument("--levels", default="1,8,64", help="concurrent clients; the first must be 1 (the reference)")
    ap.add_argument("--requests", default="100,200,1000", help="requests at each level")
    ap.add_argument("--distinct", type=int, default=100, help="distinct prompts")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--prefixes", type=int, default=5, help="distinct long prefixes (each a miss, then a hit)")
    ap.add_argument("--serve-args", default="--slots 64 --max-queue 1024 --ctx 2304 --cache-block 64",
                    help="hm serve flags of both servers (the second adds --cache-mb 0)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/SERVING.md")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    counts = [int(x) for x in a.requests.split(",")]
    if levels[0] != 1 or len(levels) != len(counts):
        raise SystemExit("--levels must start with 1 and --requests give one count per level")
    tmp = tempfile.TemporaryDirectory()
    model = a.model or os.path.join(tmp.name, "model")
    source = ["--config", a.config, "--dtype", "BF16"] if a.config else ["--preset", a.preset]
    if not a.model:
        subprocess.run([a.hm, "init", *source, "--out", model], check=True, stdout=subprocess.DEVNULL)
    flags = shlex.split(a.serve_args)
    out = {"model": a.model or f"hm init {' '.join(source)} (random weights)", "cpu": cpu_name(),
           "cores": len(os.sched_getaffinity(0)), "serve_args": a.serve_args,
           "loadavg_start": list(os.getloadavg()), "max_tokens": a.max_tokens, "levels": []}

    shared = "A shared system prompt that many requests start with, long enough to span blocks. " * 3
    bodies = [{"prompt": (shared if i % 2 == 0 else "") + f"request {i}: " + "xyz"[i % 3] * (i % 7),
               "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True} for i in range(a.distinct)]
    # Long prefixes of exactly --prefix-tokens tokens (BOS included), each different from its first
    # block on; then a question.
    srv = Server(a.hm, model, flags)
    ok = True
    try:
        reference = None
        for clients, n in zip(levels, counts):
            r, done = level(srv, bodies, clients, n, reference)
            if reference is None:  # one client: each prompt alone, once
                reference = {k: res["text"] for k, res in done}
                if len(reference) != len(bodies):
                    ok = False
            out["levels"].append(r)
            ok = ok and r["failed"] == 0 and r["differing"] == 0 and r["ok"] == n
            print(json.dumps(r), flush=True)
        words = ("state", "cache", "block", "token", "layer", "model", "hybrid", "prefix", "server", "batch")
        prefixes = []
        for k in range(a.prefixes):
            text = f"[document {k}] " + " ".join(words[(i * (k + 3)) % len(words)] for i in range(2 * a.prefix_tokens))
            ids = srv.post("/tokenize", {"content": text, "add_special": True})["tokens"][:a.prefix_tokens]
            if len(ids) != a.prefix_tokens:
                raise SystemExit("the prefix text is too short")
            prefixes.append(ids)
        questions = [srv.post("/tokenize", {"content": f" Question {q}: what comes next?"})["tokens"] for q in (1, 2)]
        miss, hit = prefix_ttft(srv, prefixes, questions, 8)
    finally:
        rc = srv.stop()
    # The same server without the cache: --serve-args' own --cache-mb (if any) replaced by 0.
    off_flags = [f for i, f in enumerate(flags)
                 if f != "--cache-mb" and not (i > 0 and flags[i - 1] == "--cache-mb") and not f.startswith("--cache-mb=")]
    srv = Server(a.hm, model, off_flags + ["--cache-mb", "0"])
    try:
        off1, off2 = prefix_ttft(srv, prefixes, questions, 8)
    finally:
        rc_off = srv.stop()
    off = off1 + off2
    for x, y in zip(hit + miss, off2 + off1):  # the cache changes no token
        ok = ok and x["text"] == y["text"]
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    pc = {"prefix_tokens": a.prefix_tokens, "prompt_tokens": hit[0]["prompt"],
          "hit_ttft_ms": round(1000 * med(hit, "ttft"), 1), "hit_cached": med(hit, "cached"),
          "hit_computed": med(hit, "computed"),
          "miss_ttft_ms": round(1000 * med(miss, "ttft"), 1), "miss_computed": med(miss, "computed"),
          "no_cache_ttft_ms": round(1000 * med(off, "ttft"), 1), "no_cache_computed": med(off, "computed")}
    for name, rows in (("hit", hit), ("miss", miss), ("no_cache", off)):
        pc[name + "_steps"] = med(rows, "steps")
        pc[name + "_forward_ms"] = round(1000 * med(rows, "forward"), 1)
        pc[name + "_cache_ms"] = round(1000 * med(rows, "cache"), 2)
        pc[name + "_evictions"] = med(rows, "evictions")
        pc[name + "_server_ttft_ms"] = round(1000 * med(rows, "server_ttft"), 2)
        pc[name + "_queue_ms"] = round(1000 * med(rows, "queue"), 2)
        pc[name + "_admit_ms"] = round(1000 * med(rows, "admit"), 2)
    pc["hit_vs_miss"] = round(pc["miss_ttft_ms"] / pc["hit_ttft_ms"], 1)
    pc["hit_vs_no_cache"] = round(pc["no_cache_ttft_ms"] / pc["hit_ttft_ms"], 1)
    out["prefix_cache"] = pc
    out["server_exit"] = [rc, rc_off]
    out["loadavg_end"] = list(os.getloadavg())
    ok = ok and rc == 143 and rc_off == 143
    out["ok"] = ok
    print(json.dumps(pc), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    if a.markdown:
        print("\n| clients | requests | failed | differing | output tok/s | TTFT p50 / p99 (ms) | "
              "ITL p50 / p99 (ms) | TPOT p50 / p99 (ms) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in out["levels"]:
            print(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['differing']} | {r['output_tok_s']} | "
                  f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} | "
                  f"{r['tpot_p50_ms']} / {r['tpot_p99_ms']} |")
        print(f"\n| {a.prefix_tokens}-token prefix | TTFT median (ms) | tokens computed |")
        print("| --- | ---: | ---: |")
        print(f"| hit | {pc['hit_ttft_ms']} | {pc['hit_computed']:.0f} ({pc['hit_cached']:.0f} cached) |")
        print(f"| miss (cache on) | {pc['miss_ttft_ms']} | {pc['miss_computed']:.0f} |")
        print(f"| no cache | {pc['no_cache_ttft_ms']} | {pc['no_cache_computed']:.0f} |")
        print("\n| request | client TTFT | server TTFT | of it: queue | admit (restore) | forward, whole request "
              "(steps) | cache records |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in ("hit", "miss", "no_cache"):
            print(f"| {name} | {pc[name + '_ttft_ms']} | {pc[name + '_server_ttft_ms']} | {pc[name + '_queue_ms']} | "
                  f"{pc[name + '_admit_ms']} | {pc[name + '_forward_ms']} ({pc[name + '_steps']:.0f}) | "
                  f"{pc[name + '_cache_ms']} |")
    if not ok:
        print("FAILED: failed or differing requests, or a server exit other than 143", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
