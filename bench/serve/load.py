#!/usr/bin/env python3
"""A bounded load generator for OpenAI-compatible servers (ours, or llama.cpp's llama-server).

For each concurrency level C it runs C client threads; each sends REQUESTS_PER_CLIENT streaming
/v1/completions requests one after the other (a prompt of token ids whose first token is new to every
request, so no prefix cache helps; max_tokens N, greedy, ignore_eos) and records the time to the first token
and the gaps between later tokens. Prints one JSON line per level and server: generated tokens/s over the
level's wall time, p50/p99 TTFT and inter-token latency; with several --url the servers take turns at each
level, and --table prints them side by side.

Only loopback URLs are accepted; every request has a timeout; the run stops by itself.

    python3 bench/serve/load.py --url ours=http://127.0.0.1:8000 --url llama=http://127.0.0.1:8001 \
        --model NAME --levels 1,4,16 --max-tokens 32 --table
"""
import argparse
import http.client
import itertools
import json
import sys
import threading
import time
import urllib.parse


FIRST = itertools.count(20000)


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def one_request(host, port, body, timeout):
    """Returns (ttft, [gaps], tokens) for one streaming request."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    ttft, last, gaps, tokens = None, None, [], 0
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        choices = chunk.get("choices") or []
        if not choices or not choices[0].get("text"):
            continue
        now = time.perf_counter()
        tokens += 1
        if ttft is None:
            ttft = now - t0
        else:
            gaps.append(now - last)
        last = now
    conn.close()
    return ttft, gaps, tokens


def level(url, model, prompt, max_tokens, clients, per_client, timeout):
    u = urllib.parse.urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing a non-loopback URL: {url}")
    ttfts, gaps, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client():
        for _ in range(per_client):
            # Each request's prompt starts with a token no earlier request had, so no server can reuse a
            # cached prefix (llama-server caches prompts by default): every TTFT includes a full prefill.
            with lock:
                first = next(FIRST)
            body = json.dumps({"model": model, "prompt": [first] + prompt[1:], "max_tokens": max_tokens,
                               "temperature": 0, "stream": True, "ignore_eos": True})
            try:
                t, g, n = one_request(u.hostname, u.port, body, timeout)
            except Exception as e:  # noqa: BLE001 - reported, counted
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                if t is not None:
                    ttfts.append(t)
                gaps.extend(g)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * per_client + 10)
    wall = time.perf_counter() - t0
    return {"concurrency": clients, "requests": clients * per_client, "errors": len(errors),
            "tokens": tokens[0], "wall_s": round(wall, 3), "tokens_per_s": round(tokens[0] / wall, 2),
            "ttft_p50_ms": round(1e3 * pct(ttfts, 50), 1) if ttfts else None,
            "ttft_p99_ms": round(1e3 * pct(ttfts, 99), 1) if ttfts else None,
            "itl_p50_ms": round(1e3 * pct(gaps, 50), 2) if gaps else None,
            "itl_p99_ms": round(1e3 * pct(gaps, 99), 2) if gaps else None,
            "first_error": errors[0] if errors else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", action="append", default=[],
                    help="LABEL=URL, or URL (label from --label); repeat to compare servers level by level")
    ap.add_argument("--model", required=True)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--label", default="")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per server before the levels")
    ap.add_argument("--table", action="store_true", help="print a markdown table comparing the servers")
    a = ap.parse_args()
    targets = []
    for u in a.url:
        label, _, url = u.rpartition("=") if "=" in u and not u.startswith("http") else (a.label, "", u)
        targets.append((label or url, url))
    if not targets:
        sys.exit("give at least one --url")
    prompt = [1000 + 37 * i % 40000 for i in range(a.prompt_len)]
    for label, url in targets:
        if a.warmup:
            level(url, a.model, prompt, a.max_tokens, 1, a.warmup, a.timeout)
    # The servers take turns at every level (a burst of load from elsewhere hits all of them alike). Throughput
    # at each level is also given relative to 1 concurrent client of the same server in the same run: the gain
    # continuous batching gives (only ratios within one run mean anything on a shared machine).
    solo, rates, results = {}, {}, {}
    for c in [int(x) for x in a.levels.split(",")]:
        for label, url in targets:
            r = level(url, a.model, prompt, a.max_tokens, c, a.requests_per_client, a.timeout)
            r["server"] = label
            if c == 1 and r["errors"] == 0:
                solo[label] = r["tokens_per_s"]
            r["tokens_per_s_vs_1"] = round(r["tokens_per_s"] / solo[label], 3) if label in solo else None
            rates[(label, c)] = r["tokens_per_s"]
            results[(label, c)] = r
            print(json.dumps(r), flush=True)
    for label, _ in targets:
        if label in solo and (label, 16) in rates:
            print(json.dumps({"server": label, "batching_gain_16_vs_1": round(rates[(label, 16)] / solo[label], 3),
                              "tokens_per_s_1": solo[label], "tokens_per_s_16": rates[(label, 16)]}), flush=True)
    if a.table and len(targets) >= 2:
        (la, _), (lb, _) = targets[0], targets[1]
        f = lambda x: "n/a" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"
        print()
        print(f"| concurrent | {la} tok/s | {lb} tok/s | ratio | TTFT p50 / p99 ms: {la} | {lb} | "
              f"inter-token p50 / p99 ms: {la} | {lb} | errors |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c in [int(x) for x in a.levels.split(",")]:
            ra, rb = results[(la, c)], results[(lb, c)]
            ratio = f"{ra['tokens_per_s'] / rb['tokens_per_s']:.2f}" if rb["tokens_per_s"] else "n/a"
            print(f"| {c} | {f(ra['tokens_per_s'])} | {f(rb['tokens_per_s'])} | {ratio} | "
                  f"{f(ra['ttft_p50_ms'])} / {f(ra['ttft_p99_ms'])} | {f(rb['ttft_p50_ms'])} / {f(rb['ttft_p99_ms'])} | "
                  f"{f(ra['itl_p50_ms'])} / {f(ra['itl_p99_ms'])} | {f(rb['itl_p50_ms'])} / {f(rb['itl_p99_ms'])} | "
                  f"{ra['errors']} / {rb['errors']} |")


if __name__ == "__main__":
    main()
