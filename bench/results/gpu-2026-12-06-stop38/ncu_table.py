"""Tables of an ncu --csv --page raw run with gpu__time_duration.sum (callU, callZ).
`list`: every kernel in launch order. `forward GRID`: the last forward whose embedding kernel had
grid size GRID (the case's tokens x ceil(d_model / 256)), up to the next embedding launch,
summed per kernel name. A .gz file is read as such."""
import collections
import csv
import gzip
import sys

opener = gzip.open if sys.argv[1].endswith(".gz") else open
lines = opener(sys.argv[1], "rt").read().splitlines()
start = [k for k, l in enumerate(lines) if l.startswith('"ID"')][0]
rows = list(csv.reader(lines[start:]))
h = rows[0]
ki, ti, gi, bi = (h.index(c) for c in ("Kernel Name", "gpu__time_duration.sum", "launch__grid_size", "launch__block_size"))
num = lambda v: float(v.replace(",", ""))
seq = [(r[ki].split("(")[0].replace("void ", "").replace("hm::cuda::", "").replace("(anonymous namespace)::", ""),
        num(r[ti]) / 1e3, r[gi], r[bi]) for r in rows[2:]]  # ns -> us
if sys.argv[2] == "list":
    for n, t, g, b in seq:
        print("%-70s %9.1f us grid %7s blk %4s" % (n[:70], t, g, b))
else:
    emb = [k for k, s in enumerate(seq) if "embedding" in s[0]]
    mine = [k for k in emb if int(num(seq[k][2])) == int(sys.argv[3])]
    nxt = [k for k in emb if k > mine[-1]]
    last = seq[mine[-1]:(nxt[0] if nxt else len(seq))]
    print("last forward: %d kernels, %.1f us of GPU time" % (len(last), sum(s[1] for s in last)))
    agg = collections.defaultdict(lambda: [0, 0.0])
    for n, t, g, b in last:
        agg[n[:90]][0] += 1
        agg[n[:90]][1] += t
    for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
        print("%-90s n %3d  %8.1f us  (%.1f each)" % (n, c, t, t / c))
