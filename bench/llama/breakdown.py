"""Groups `perf report --sort symbol` output (from bench/llama/breakdown.sh) by what each symbol does and
prints one Markdown table: the share of samples per group in each layout, and each run's decode rate."""

import json
import re
import sys
from pathlib import Path

# First match wins; patterns are searched in the symbol name.
GROUPS = [
    ("matrix-vector kernels (decode products, LM head)",
     r"rows_dot|rows_vnni|rows_avx2|rows16|rows_multi|rows_int|QMatrix::matvec|math::matvec"),
    ("f32 dot products (the exact path's products; attention scores)", r"math::dot\b"),
    # The per-head attention closure runs inside par's chunk closure, where its value sums are inlined.
    ("attention (softmax, value sums)", r"Compute>::attention|__expf|softmax|par::for_each_chunk::\{\{closure"),
    ("activation quantization (int8/int16 paths)", r"quantize|Q8Vec|Q16Vec"),
    ("RMSNorm", r"rms_norm"),
    ("RoPE and KV append", r"rope|kv_append"),
    ("SiLU-mul, residual add", r"silu|residual"),
    ("compute threads: helpers polling, caller waiting (llm::par)", r"par::helper|wait_for_job|Team::run|take_tasks"),
    ("all-reduce and rank synchronisation", r"nccl::host|barrier|futex|sched_yield|__schedule|finish_task_switch"),
    ("sampling, logits gather", r"sample|argmax|logits"),
    ("load and prefill (dequantize, GEMM, page faults)",
     r"from_ggml|dequant|gemm|f16_le|page_fault|anonymous_page|handle_mm_fault|clear_page|memcmp|mmap"),
]


def shares(report: Path) -> dict:
    out = {name: 0.0 for name, _ in GROUPS}
    out["other (allocation, copies, kernel)"] = 0.0
    for line in report.read_text().splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+\[[.k]\]\s+(.*)", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), m.group(2)
        for name, pat in GROUPS:
            if re.search(pat, sym):
                out[name] += pct
                break
        else:
            out["other (allocation, copies, kernel)"] += pct
    return out


def main() -> None:
    d = Path(sys.argv[1])
    # One column per profiled run (breakdown.sh's layouts, in its order), titled from the run's own JSON.
    titles, runs = [], []
    for run in sorted(d.glob("*.json")):
        j = json.loads(run.read_text())
        titles.append(f"TP={j['tp']}, {j['threads_per_rank']} thread(s) per rank")
        runs.append((shares(run.with_suffix(".txt")), j.get("decode_tokens_per_s", float("nan"))))
    print("| where the samples fall | " + " | ".join(titles) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for name in runs[0][0]:
        print(f"| {name} | " + " | ".join(f"{r[0][name]:.1f} %" for r in runs) + " |")
    print("| decode tokens/s in the same run | " + " | ".join(f"{r[1]:.1f}" for r in runs) + " |")


if __name__ == "__main__":
    main()
