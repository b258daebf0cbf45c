"""Model of kernels/src/hadamard.cu's padded shared-memory indexing (sidx<true>): for every (m, K) and rows per CTA,
every access of stage 0, the stages s >= 1, the staged store (m = 1, K = 6..9) and the mix checks
  1. sidx(base, off) == pad(base + off)  (the split into one register plus a compile-time offset is exact), and
  2. the 32 lanes of a warp touch 32 different banks (4-byte words).
Run: python3 scripts/hadamard_smem_model.py  (prints the number of problems; 0 expected)."""


def pad(i):
    return i + (i >> 5)


def sidx(base, off):
    return base + (base >> 5) + off + (off >> 5)


def conflict_free(addrs):
    per_bank = {}
    for a in addrs:
        per_bank.setdefault(a % 32, set()).add(a)
    return max(len(s) for s in per_bank.values()) == 1


def check(m, k, rpc):
    bad, n = 0, m << k
    items = rpc * (n >> 5)
    for u0 in range(0, min(items, 256), 32):  # stage 0: item u writes u * 32 + j
        for j in range(32):
            us = range(u0, min(u0 + 32, items))
            bad += sum(sidx(u * 32, j) != pad(u * 32 + j) for u in us)
            bad += not conflict_free([sidx(u * 32, j) for u in us])
    vbits = k - 5
    for s in range(1, (k + 4) // 5):
        w0 = min(5 * s, vbits)
        for u0 in range(0, min(items, 4096), 32):
            for j in range(32):
                addrs = []
                for u in range(u0, min(u0 + 32, items)):
                    seg, vv = u >> vbits, u & ((1 << vbits) - 1)
                    base = (seg << k) + (((vv >> w0) << (w0 + 5)) | (vv & ((1 << w0) - 1)))
                    bad += sidx(base, j << w0) != pad(base + (j << w0))
                    addrs.append(sidx(base, j << w0))
                bad += not conflict_free(addrs)
    if m > 1:
        for t0 in range(0, rpc << k, 32):
            for a in range(m):
                addrs = []
                for t in range(t0, t0 + 32):
                    base = (t >> k) * n + (t & ((1 << k) - 1))
                    bad += sidx(base, a << k) != pad(base + (a << k))
                    addrs.append(sidx(base, a << k))
                bad += not conflict_free(addrs)
    if m == 1 and 5 < k < 10:
        for per in (4, 8):  # fp32 / 2-byte elements per 16-byte store
            for e0 in range(0, rpc * n, 32 * per):
                for i in range(per):
                    es = range(e0, e0 + 32 * per, per)
                    bad += sum(sidx(e, i) != pad(e + i) for e in es)
                    bad += not conflict_free([sidx(e, i) for e in es])
    return bad


def main():
    bad = 0
    for m in (1, 12, 20, 28):
        for k in range(5, 16):
            if (m << k) > 32768:
                continue
            rpc = (1 if k >= 9 else 512 >> k) if m > 1 else max(1, -(-256 // ((m << k) >> 5)))
            for r in sorted({rpc, 1}):
                bad += check(m, k, r)
    print("problems:", bad)
    return bad


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
