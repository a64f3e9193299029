# Offline model of next-unverified.patch's dB/dC transpose in fast_grad_kernel (no GPU needed):
# lane l writes its 16 values as 4 float4 to row l, float4 j at slot j ^ ((l >> 1) & 3); lane l
# then sums value l >> 1 over the lanes 2 c + (l & 1). Checks the sums and that every 128-bit
# store quarter-warp and every 32-bit load hits 32 distinct banks.
import random

v = [[random.random() for _ in range(16)] for _ in range(32)]
xw = [None] * (32 * 16)
for j in range(4):
    addrs = []
    for l in range(32):
        slot = j ^ ((l >> 1) & 3)
        for t in range(4):
            xw[l * 16 + 4 * slot + t] = v[l][4 * j + t]
        addrs.append(l * 16 + 4 * slot)
    for qw in range(4):
        banks = {(addrs[l] + t) % 32 for l in range(8 * qw, 8 * qw + 8) for t in range(4)}
        assert len(banks) == 32, ("store conflict", j, qw)
for cc in range(16):
    banks = {((l & 1) * 16 + ((l >> 1) & 3) + cc * 32 + 4 * (((l >> 1) >> 2) ^ (cc & 3))) % 32 for l in range(32)}
    assert len(banks) == 32, ("load conflict", cc)
for l in range(32):
    q, vi = l & 1, l >> 1
    got = sum(xw[q * 16 + (vi & 3) + cc * 32 + 4 * ((vi >> 2) ^ (cc & 3))] for cc in range(16))
    want = sum(v[2 * c + q][vi] for c in range(16))
    assert abs(got - want) < 1e-9, (l, got, want)
print("transpose: sums and bank pattern ok")
