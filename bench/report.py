#!/usr/bin/env python3
"""Aggregate bench/run's raw rows into one table: stdout, markdown and an SVG bar chart.

usage: report.py RAW.tsv META.txt OUT.md OUT.svg
RAW.tsv columns: case contender round rps p50_ms p99_ms cpu_s rss_kib errors requests extra sys_s
(extra: MiB/s for case 3, KiB per idle connection for case 7, access log lines dropped for
keel-log). Standard library only."""
import statistics, sys
from collections import defaultdict

CASES = {
    "1": "HTTP/1.1 keep-alive, 64 conns, 2-byte body",
    "2": "new connection per request (Connection: close)",
    "3": "1 MiB responses, 16 conns (throughput)",
    "4": "TLS termination, keep-alive, 64 conns",
    "5": "TLS handshakes: new connection per request",
    "6": "HTTP/2 front end (h2c), h2load",
    "7": "idle keep-alive connections: RSS per connection",
    "8": "POST 4 KiB body, keep-alive, 64 conns",
    "9": "gRPC unary (h2c to the proxy, h2c to the servers), h2load",
}
ORDER = ["direct", "haproxy", "nginx", "keel", "keel-log", "keel-base", "keel-2w", "keel-cluster"]
LABEL = {"direct": "direct", "haproxy": "HAProxy", "nginx": "nginx", "keel": "keel",
         "keel-log": "keel + access log, human, to a file",
         "keel-base": "keel baseline, the --baseline-keel binary",
         "keel-2w": "keel, 2 workers, unpinned",
         "keel-cluster": "keel, active node of a 3-node cluster, sticky source_ip over Raft"}
COLOR = {"direct": "#9e9e9e", "haproxy": "#1f77b4", "nginx": "#2ca02c", "keel": "#d62728", "keel-log": "#e377c2",
         "keel-base": "#8c564b", "keel-2w": "#ff7f0e", "keel-cluster": "#9467bd"}

raw, meta, out_md, out_svg = sys.argv[1:5]
rows = defaultdict(list)
for line in open(raw):
    f = line.rstrip("\n").split("\t")
    if len(f) < 11 or f[0] == "case":
        continue
    rows[(f[0], f[1])].append(f)

def num(x):
    try:
        return float(x)
    except ValueError:
        return None

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def fmt(v, nd=0):
    if v is None:
        return "—"
    return f"{v:,.{nd}f}"

agg = {}
for (case, who), rs in rows.items():
    rps = [num(r[3]) for r in rs]
    good = [v for v in rps if v is not None]
    cpu_per_req, sys_per_req = [], []
    for r in rs:
        c, n = num(r[6]), num(r[9])
        s = num(r[11]) if len(r) > 11 else None
        cpu_per_req.append(c * 1e6 / n if c is not None and n else None)
        sys_per_req.append(s * 1e6 / n if s is not None and n else None)
    agg[(case, who)] = dict(
        rps=med(rps), lo=min(good) if good else None, hi=max(good) if good else None,
        p50=med(num(r[4]) for r in rs), p99=med(num(r[5]) for r in rs),
        cpu=med(num(r[6]) for r in rs), us=med(cpu_per_req), sys_us=med(sys_per_req),
        rss=med(num(r[7]) for r in rs), err=sum(int(num(r[8]) or 0) for r in rs),
        # case 7: the first exposure (largest growth); a process's allocator keeps memory it
        # grew for idle connections, so later rounds measure reuse, not cost
        extra=(max([v for v in (num(r[10]) for r in rs) if v is not None], default=None)
               if case == "7" else med(num(r[10]) for r in rs)), n=len(rs))

def key_metric(case, who):
    a = agg.get((case, who))
    if not a:
        return None
    return a["extra"] if case == "7" else a["rps"]

head = ("| case | contender | req/s median (min–max) | p50 ms | p99 ms | CPU s | CPU µs/req "
        "| peak RSS MiB | vs HAProxy | vs direct | errors |")
lines = [head, "|" + "---|" * 11]
cases = sorted({c for c, _ in agg}, key=int)
for case in cases:
    for who in ORDER:
        a = agg.get((case, who))
        if not a:
            continue
        m, h, d = key_metric(case, who), key_metric(case, "haproxy"), key_metric(case, "direct")
        r_h = f"{m / h:.2f}×" if m and h and h >= 0.05 else "—"
        r_d = f"{m / d:.2f}×" if m and d and d >= 0.05 else "—"
        if case == "7":
            rate = f"{fmt(a['extra'], 1)} KiB/conn"
        else:
            rate = f"{fmt(a['rps'])} ({fmt(a['lo'])}–{fmt(a['hi'])})"
            if case == "3" and a["extra"] is not None:
                rate += f", {fmt(a['extra'])} MiB/s"
        lines.append(f"| {case}. {CASES[case]} | {LABEL[who]} | {rate} | {fmt(a['p50'], 2)} | "
                     f"{fmt(a['p99'], 2)} | {fmt(a['cpu'], 2)} | {fmt(a['us'], 1)} | "
                     f"{fmt(a['rss'] / 1024 if a['rss'] else None, 1)} | {r_h} | {r_d} | {a['err']} |")
# Relative to standalone keel in the same run: what the second worker and the cluster cost/buy.
for who in ("keel-2w", "keel-cluster"):
    m, k = key_metric("1", who), key_metric("1", "keel")
    if m and k:
        lines.append(f"\n{LABEL[who]}: {m / k:.2f}× standalone keel's req/s in case 1")
# The access log's cost: the same keel with and without it, case 1.
k, l = agg.get(("1", "keel")), agg.get(("1", "keel-log"))
if k and l and k["rps"] and l["rps"]:
    dropped = sum(int(num(r[10]) or 0) for r in rows[("1", "keel-log")])
    lines.append(f"\n{LABEL['keel-log']}: {l['rps'] / k['rps']:.2f}× keel's req/s in case 1, CPU µs/req "
                 f"{fmt(k['us'], 1)} off → {fmt(l['us'], 1)} on; {dropped:,} lines dropped")
# keel against the baseline binary, case by case: req/s ratio and CPU per request.
base_lines = []
for case in cases:
    k, b = agg.get((case, "keel")), agg.get((case, "keel-base"))
    if not (k and b):
        continue
    ratio = f"{k['rps'] / b['rps']:.2f}×" if k["rps"] and b["rps"] else "—"
    base_lines.append(f"| {case}. {CASES[case]} | {ratio} | {fmt(b['us'], 1)} → {fmt(k['us'], 1)} |")
if base_lines:
    lines.append("\nkeel against the baseline binary (same run):\n\n"
                 "| case | keel req/s vs baseline | CPU µs/req baseline → keel |\n|---|---|---|")
    lines.extend(base_lines)
# Where each proxy's CPU goes: user space (its own code) against the kernel (sockets, TCP,
# wake-ups), per request. The kernel part is what batching and fewer syscalls can win.
split_lines = []
for case in cases:
    if case == "7":
        continue
    cells = []
    for who in ORDER:
        a = agg.get((case, who))
        if a and a["us"] is not None and a["sys_us"] is not None:
            cells.append(f"{LABEL[who] if who in ('haproxy', 'nginx', 'keel', 'direct') else who} "
                         f"{fmt(a['us'] - a['sys_us'], 1)} + {fmt(a['sys_us'], 1)}")
    if cells:
        split_lines.append(f"| {case}. {CASES[case]} | " + "; ".join(cells) + " |")
if split_lines:
    lines.append("\nCPU µs/req split, user + kernel (medians of the rounds):\n\n"
                 "| case | contender user + kernel |\n|---|---|")
    lines.extend(split_lines)
table = "\n".join(lines)
meta_text = open(meta).read().strip()
notes = ("Ratios compare the median req/s (case 7: KiB per idle connection, lower is better, "
         "largest growth over the rounds, i.e. the first time the process holds them). CPU s and peak RSS are the proxy's own "
         "processes (for direct: backend 1); CPU µs/req = CPU seconds / requests served.")
print(table)
with open(out_md, "w") as f:
    f.write("# keel benchmark: latest results\n\n" + meta_text + "\n\n" + table + "\n\n" + notes +
            "\n\n![req/s per case](latest.svg)\n")

# SVG: one panel per case, a bar per contender, each panel with its own scale.
pw, ph, gap, cols = 300, 190, 20, 3
n_cases = len(cases)
rows_n = (n_cases + cols - 1) // cols
W, H = cols * (pw + gap) + gap, rows_n * (ph + gap) + gap + 60
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{gap}" y="24" font-size="15" font-weight="bold">keel vs HAProxy vs nginx — median of rounds (case 7: KiB per idle connection, lower is better)</text>']
lx = gap
for who in ORDER:
    if any(w == who for _, w in agg):
        svg.append(f'<rect x="{lx}" y="36" width="10" height="10" fill="{COLOR[who]}"/>'
                   f'<text x="{lx + 14}" y="45">{LABEL[who]}</text>')
        lx += 30 + 7 * len(LABEL[who])
for i, case in enumerate(cases):
    ox = gap + (i % cols) * (pw + gap)
    oy = 60 + gap + (i // cols) * (ph + gap)
    svg.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>')
    svg.append(f'<text x="{ox + 6}" y="{oy + 15}" font-weight="bold">{case}. {CASES[case][:46]}</text>')
    whos = [w for w in ORDER if (case, w) in agg]
    vals = [key_metric(case, w) or 0 for w in whos]
    top = max(vals) or 1
    bw = (pw - 20) / max(len(whos), 1)
    base = oy + ph - 18
    for j, (w, v) in enumerate(zip(whos, vals)):
        h = (ph - 50) * v / top
        x = ox + 10 + j * bw
        svg.append(f'<rect x="{x + 4:.1f}" y="{base - h:.1f}" width="{bw - 8:.1f}" height="{h:.1f}" fill="{COLOR[w]}"/>')
        label = f"{v:,.1f}" if case == "7" else f"{v:,.0f}"
        svg.append(f'<text x="{x + bw / 2:.1f}" y="{base - h - 3:.1f}" text-anchor="middle">{label}</text>')
        svg.append(f'<text x="{x + bw / 2:.1f}" y="{base + 13:.1f}" text-anchor="middle">{LABEL[w].split(",")[0]}</text>')
svg.append("</svg>")
with open(out_svg, "w") as f:
    f.write("\n".join(svg) + "\n")
