#!/usr/bin/env python3
"""A bounded load generator for OpenAI-compatible servers (ours, or llama.cpp's llama-server).

For each concurrency level C it runs C client threads; each sends REQUESTS_PER_CLIENT streaming
/v1/completions requests one after the other (a fixed prompt of token ids, max_tokens N, greedy,
ignore_eos) and records the time to the first token and the gaps between later tokens. Prints one JSON
line per level: generated tokens/s over the level's wall time, p50/p99 TTFT and inter-token latency.

Only loopback URLs are accepted; every request has a timeout; the run stops by itself.

    python3 bench/serve/load.py --url http://127.0.0.1:8000 --model NAME --levels 1,4,16 --max-tokens 32
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


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
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    ttfts, gaps, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client():
        for _ in range(per_client):
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
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    prompt = [1000 + 37 * i % 40000 for i in range(a.prompt_len)]
    # Throughput at each level relative to 1 concurrent client of the same server in the same run: the gain
    # continuous batching gives (only ratios within one run mean anything on a shared machine).
    solo = None
    rates = {}
    for c in [int(x) for x in a.levels.split(",")]:
        r = level(a.url, a.model, prompt, a.max_tokens, c, a.requests_per_client, a.timeout)
        r["server"] = a.label
        if c == 1 and r["errors"] == 0:
            solo = r["tokens_per_s"]
        r["tokens_per_s_vs_1"] = round(r["tokens_per_s"] / solo, 3) if solo else None
        rates[c] = r["tokens_per_s"]
        print(json.dumps(r), flush=True)
    if solo and 16 in rates:
        print(json.dumps({"server": a.label, "batching_gain_16_vs_1": round(rates[16] / solo, 3),
                          "tokens_per_s_1": solo, "tokens_per_s_16": rates[16]}), flush=True)


if __name__ == "__main__":
    main()
