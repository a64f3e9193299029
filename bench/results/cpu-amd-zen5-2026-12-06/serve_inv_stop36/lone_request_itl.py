import json, sys, time, subprocess, urllib.request
hm, model, inv, port = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
args = [hm, "serve", "--model", model, "--port", str(port), "-t", "2", "--slots", "64", "--ctx", "2304", "--max-queue", "1024", "--cache-block", "64"] + (["--batch-invariant"] if inv else [])
p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1); break
    except Exception: time.sleep(0.1)
def req():
    body = json.dumps({"prompt": "A shared system prompt that many requests start with, long enough to span blocks. " * 3 + "request 0: x", "max_tokens": 32, "temperature": 0, "ignore_eos": True}).encode()
    t = time.time()
    r = json.load(urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})))
    return time.time() - t, r["usage"]["completion_tokens"]
req()
ts = [req() for _ in range(5)]
print("inv" if inv else "default", [f"{t*1000/n:.2f} ms/tok" for t, n in ts])
p.terminate(); p.wait()
