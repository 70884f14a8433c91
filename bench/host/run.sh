#!/usr/bin/env bash
# Host all-reduce (f32 sum, 2 ranks) from 8 B to 64 MiB: threads, processes (cross-memory attach where it
# works) and processes staged through the shared segment, next to a single-thread memcpy of the same size
# and OpenMPI's MPI_Allreduce, all in one run: $REPS interleaved repetitions (ours, then OpenMPI, then ours
# ...), medians per size. Then the same with $BUSY extra busy processes (oversubscription: more runnable
# threads than cores), as a ratio to the idle medians.
#
#   bench/host/run.sh            # needs mpicc/mpirun (Debian: openmpi-bin libopenmpi-dev) for the MPI column
#
# Results: $OUT/*.txt (raw tables) and the summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-5}
BUSY=${BUSY:-2}
OUT=${OUT:-/tmp/host_bench_results}
rm -rf "$OUT"
mkdir -p "$OUT"
cargo bench -p nccl-rs --bench host_table --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and "host_table" in m["executable"]]' \
  > "$OUT/exe"
TABLE=$(tail -1 "$OUT/exe")
MPI=""
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  mpicc -O2 -o "$OUT/mpi_allreduce" bench/mpi/allreduce.c && MPI="$OUT/mpi_allreduce"
else
  echo "mpicc/mpirun missing: no OpenMPI column (Debian: apt install openmpi-bin libopenmpi-dev)" >&2
fi
mpi() { timeout 600 mpirun --allow-run-as-root --oversubscribe -np 2 "$MPI" "$@"; }
uptime > "$OUT/uptime_start.txt"
for r in $(seq "$REPS"); do
  "$TABLE" > "$OUT/ours_$r.txt" 2> "$OUT/ours_$r.err"
  [ -n "$MPI" ] && mpi > "$OUT/mpi_$r.txt" 2>&1
done
uptime > "$OUT/uptime_idle_end.txt"
# Oversubscription: $BUSY spinning processes beside the 2 ranks (on this 2-core machine: twice as many
# runnable threads as cores). One repetition of each.
pids=()
for _ in $(seq "$BUSY"); do python3 -c 'while True: pass' & pids+=($!); done
sleep 1
"$TABLE" > "$OUT/busy_ours.txt" 2> "$OUT/busy_ours.err" || true
[ -n "$MPI" ] && { mpi > "$OUT/busy_mpi.txt" 2>&1 || echo "OpenMPI under load: failed or timed out" > "$OUT/busy_mpi.txt"; }
kill "${pids[@]}"
uptime > "$OUT/uptime_end.txt"

python3 - "$OUT" "$REPS" "$BUSY" <<'PY'
import glob, statistics, sys
out, reps, busy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ours(path):
    rows = {}
    for line in open(path):
        f = line.split()
        if len(f) == 9 and f[0].isdigit():
            num = lambda x: float(x) if x != "-" else None
            rows[int(f[0])] = dict(thr=num(f[1]), proc=num(f[2]), staged=num(f[3]), cpy=num(f[4]))
    return rows
def mpi(path):
    rows = {}
    for line in open(path):
        f = line.split()
        if len(f) == 3 and f[0].isdigit():
            rows[int(f[0])] = float(f[1])
    return rows
runs = [ours(p) for p in sorted(glob.glob(f"{out}/ours_*.txt"))]
mruns = [mpi(p) for p in sorted(glob.glob(f"{out}/mpi_*.txt"))]
sizes = sorted(runs[0])
med = lambda xs: statistics.median(xs) if xs else None
def m(col, b):
    return med([r[b][col] for r in runs if b in r and r[b][col] is not None])
def mm(b):
    return med([r[b] for r in mruns if b in r])
fmt = lambda x: "n/a" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")
rat = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.2f}"
print(f"Median of {len(runs)} interleaved runs (OpenMPI: {len(mruns)}); time per all-reduce in µs; ratios in the same run.")
print(open(f"{out}/uptime_start.txt").read().strip(), "| at the end of the idle runs:", open(f"{out}/uptime_idle_end.txt").read().strip())
print()
print("| size | threads | processes | processes staged | OpenMPI | memcpy | threads ÷ memcpy (bw) | processes ÷ memcpy (bw) | OpenMPI ÷ threads (time) | OpenMPI ÷ processes (time) |")
print("|---|---|---|---|---|---|---|---|---|---|")
name = lambda b: f"{b} B" if b < 1024 else (f"{b >> 10} KiB" if b < 1 << 20 else f"{b >> 20} MiB")
for b in sizes:
    t, p, s, c, o = m("thr", b), m("proc", b), m("staged", b), m("cpy", b), mm(b)
    print(f"| {name(b)} | {fmt(t)} | {fmt(p)} | {fmt(s)} | {fmt(o)} | {fmt(c)} | {rat(c, t)} | {rat(c, p)} | {rat(o, t)} | {rat(o, p)} |")
print()
try:
    bo = ours(f"{out}/busy_ours.txt")
    bm = mpi(f"{out}/busy_mpi.txt") if glob.glob(f"{out}/busy_mpi.txt") else {}  # no OpenMPI: n/a column
    print(f"Oversubscribed ({busy} busy processes beside the 2 ranks), one run, as time ÷ the idle median:")
    print()
    print("| size | threads | processes | OpenMPI |")
    print("|---|---|---|---|")
    for b in sizes:
        print(f"| {name(b)} | {rat(bo.get(b, {}).get('thr'), m('thr', b))} | {rat(bo.get(b, {}).get('proc'), m('proc', b))} | {rat(bm.get(b), mm(b))} |")
except (FileNotFoundError, KeyError) as e:
    print("oversubscribed run missing:", e)
PY
