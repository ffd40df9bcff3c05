"""The side-by-side table from one run: llama-bench's JSON and `oracle speed --json` per format.

    python3 ci/side-by-side.py FORMAT:LLAMA_PP.json:LLAMA_TG.json:BITEXACT.json ...
    python3 ci/side-by-side.py --batched FORMAT:LLAMA_BATCHED.jsonl:BITEXACT.json ...

Batched: llama-batched-bench's aggregate generation rate (S_TG: sequences x 128 tokens over the
time of those steps, its KV cache f16) against `oracle speed --batched-only` (sequences over the
median step, f32 KV cache), per (context, sequences).

Medians on both sides (llama-bench: of its per-repetition tokens/s; bitexact: of its timed
prefills or decode steps), the spread (min-max) beside each, and the ratio bitexact/llama.cpp.
A ratio whose range over the two spreads contains 1 is a tie.
"""
import json
import statistics
import sys


def llama_rows(path):
    rows = {}
    for t in json.load(open(path)):
        ts = t.get("samples_ts") or [t["avg_ts"]]
        if t["n_gen"] == 0:
            key = ("prefill", t["n_prompt"])
        else:
            key = ("decode", t.get("n_depth", 0))
        rows[key] = (statistics.median(ts), min(ts), max(ts), len(ts))
    return rows


def ours_rows(path):
    rows = {}
    for r in json.load(open(path)):
        tok = r["tokens"] if r["phase"] == "prefill" else 1
        # tokens/s at the median, and at the slowest / fastest sample
        rows[(r["phase"], r["tokens"])] = (
            tok / r["median_s"],
            tok / r["max_s"],
            tok / r["min_s"],
            r["samples"],
        )
    return rows


def verdict(um, ulo, uhi, lm, llo, lhi):
    ratio = um / lm
    lo, hi = ulo / lhi, uhi / llo
    return ratio, "tie" if lo <= 1.0 <= hi else ("faster" if ratio > 1 else "slower")


def batched(args):
    print("| format | context | sequences | llama.cpp tok/s (min-max, n) | bitexact tok/s (min-max, n) | bitexact steps | ratio | |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    for arg in args:
        fmt, ll_path, ours = arg.split(":")
        ll = {}
        for line in open(ll_path):
            line = line.strip()
            if not line.startswith("{"):
                continue
            t = json.loads(line)
            ll.setdefault((t["pp"], t["pl"]), []).append(t["speed_tg"])
        for r in json.load(open(ours)):
            if r["phase"] not in ("batched decode", "batched decode graph"):
                continue
            # The graph pass follows the eager one on the same sequences: its steps start
            # later (`tokens`); both belong to the --decode-at context llama.cpp's row has.
            key = (r.get("context", r["tokens"]), r["sequences"])
            mode = "graph" if r["phase"].endswith("graph") else "eager"
            if key not in ll:
                continue
            ts = ll[key]
            lm, llo, lhi = statistics.median(ts), min(ts), max(ts)
            s = r["sequences"]
            um, ulo, uhi = s / r["median_s"], s / r["max_s"], s / r["min_s"]
            ratio, v = verdict(um, ulo, uhi, lm, llo, lhi)
            print(f"| {fmt} | {key[0]} | {s} | {lm:,.1f} ({llo:,.1f}-{lhi:,.1f}, {len(ts)}) | "
                  f"{um:,.1f} ({ulo:,.1f}-{uhi:,.1f}, {r['samples']}) | {mode}, from {r['tokens']} | "
                  f"{ratio:.2f} | {v} |")


def main(args):
    if args and args[0] == "--batched":
        return batched(args[1:])
    print("| format | test | llama.cpp tok/s (min-max, n) | bitexact tok/s (min-max, n) | ratio | |")
    print("|---|---|---:|---:|---:|---|")
    for arg in args:
        fmt, pp, tg, ours = arg.split(":")
        ll = llama_rows(pp)
        ll.update(llama_rows(tg))
        us = ours_rows(ours)
        for key in sorted(ll, key=lambda k: (k[0] != "prefill", k[1])):
            if key not in us:
                continue
            lm, llo, lhi, ln = ll[key]
            um, ulo, uhi, un = us[key]
            ratio, v = verdict(um, ulo, uhi, lm, llo, lhi)
            name = f"prefill {key[1]}" if key[0] == "prefill" else (
                "decode, empty context" if key[1] == 0 else f"decode at depth {key[1]}")
            print(f"| {fmt} | {name} | {lm:,.1f} ({llo:,.1f}-{lhi:,.1f}, {ln}) | "
                  f"{um:,.1f} ({ulo:,.1f}-{uhi:,.1f}, {un}) | {ratio:.2f} | {v} |")


if __name__ == "__main__":
    main(sys.argv[1:])
