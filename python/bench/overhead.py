"""Decode speed from Python against `hm generate` on the same checkpoint, prompt, settings and
seed, runs interleaved so both see the same machine load (docs/PYTHON.md, "Overhead").

    PYTHONPATH=build/python python3 python/bench/overhead.py build/hm [--reps 5] [-n 256] [-t 0]

Also prints the time per token the Python side adds (the per-token callback that takes the
GIL and checks for Ctrl-C, the stream's queue): a difference of per-token times, most telling
on the tiny preset, whose tokens cost little compute.
"""
import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time

import hybrid_mamba as hmpy


def cli_decode_tps(hm, model_dir, n, seed, threads):
    r = subprocess.run([hm, "generate", "--model", model_dir, "--prompt", "Hello", "-n", str(n), "--seed", str(seed),
                        "--stats", "-t", str(threads)], capture_output=True, text=True, check=True)
    m = re.search(r"decode: (\d+) tokens in ([\d.]+) ms", r.stderr)
    return int(m.group(1)) / (float(m.group(2)) / 1000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hm")
    ap.add_argument("--preset", default="seed")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=0, help="0: every core, as hm's default")
    a = ap.parse_args()
    hmpy.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "model")
        subprocess.run([a.hm, "init", "--preset", a.preset, "--out", d], check=True, capture_output=True)
        model = hmpy.HybridMambaModel.from_pretrained(d)
        ids = model.tokenizer.encode("Hello")
        res = {"hm generate": [], "generate (engine timer)": [], "generate (Python wall clock)": [],
               "generate_stream (Python wall clock)": []}
        for rep in range(a.reps):
            res["hm generate"].append(cli_decode_tps(a.hm, d, a.n, rep, a.threads))
            t0 = time.perf_counter()
            out = model.generate(ids, a.n, seed=rep)
            wall = time.perf_counter() - t0
            st = model.last_stats
            res["generate (engine timer)"].append(st["decoded_tokens"] / (st["decode_ms"] / 1000))
            # Everything the caller waits for after the prompt: the call minus the prefill.
            res["generate (Python wall clock)"].append(st["decoded_tokens"] / (wall - st["prefill_ms"] / 1000))
            t0 = time.perf_counter()
            k = 0
            for _ in model.generate_stream(ids, a.n, seed=rep):
                k += 1
            wall = time.perf_counter() - t0
            st = model.last_stats
            res["generate_stream (Python wall clock)"].append(k / (wall - st["prefill_ms"] / 1000))
            assert len(out) - len(ids) == k
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        print(f"{a.preset} preset, prompt 'Hello', {a.n} new tokens, {a.reps} interleaved runs, "
              f"{hmpy.num_threads()} threads, {cpu}, load average {os.getloadavg()[0]:.1f}")
        base = statistics.median(res["hm generate"])
        for k, v in res.items():
            med = statistics.median(v)
            print(f"  {k:38s} median {med:8.1f} tok/s  ({med / base:.3f} of hm generate, "
                  f"{1e6 / med - 1e6 / base:+7.1f} us/token)  runs {' '.join(f'{x:.0f}' for x in v)}")


if __name__ == "__main__":
    main()
