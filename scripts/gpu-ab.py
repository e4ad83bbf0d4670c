#!/usr/bin/env python3
"""The GPU check's A/B bookkeeping (run by scripts/gpu-check.sh on the lent GPU machine).

  gpu-ab.py record OUT "VARS" SHAPE ARGS...   bench --json rows on stdin -> OUT/ab.jsonl, one
                                              printed line per row
  gpu-ab.py choose OUT                        per switch: every pair of A/B rows that differ in
                                              it alone, the ratio of their times, the choice;
                                              writes the chosen switches to OUT/best.env (never
                                              a value in OUT/untrusted.env: its GPU tests
                                              failed in this call)
  gpu-ab.py summary OUT LABEL FILE...         the table of bench rows or recorded rows (+ the HF
                                              anchor's rows from OUT/hf.log when present)
  gpu-ab.py compare OUT                       the rows recorded with the chosen switches
                                              (OUT/best/ab.jsonl) against the A/B rows of the
                                              defaults

A switch's non-default value is chosen only when it is faster on the geometric mean of its
pairs by more than NOISE and slower on none by more than HARM, so a choice never rests on one
line or gives back a loss elsewhere. Rows are paired by shape, the bench arguments other than
--batch, phase and batch, so `--batch 1,64` and `--batch 64` lines pair.
"""
import json
import math
import os
import sys

# The defaults of the GPU switches (README, "GPU switches"); GATE_FIRST's default is a rule.
DEFAULTS = {
    "THINKSTEER_ROPE": "separate",
    "THINKSTEER_GEMV_WARPS": "16",
    "THINKSTEER_GEMV_ROWS": "32",
    "THINKSTEER_GATE_FIRST": "auto",
    "THINKSTEER_HYBRID_STREAMS": "2",
    "THINKSTEER_GEMM_FROM": "129",
    "THINKSTEER_GEMM": "64",
    "THINKSTEER_ATTN": "head",
    "THINKSTEER_PREFILL_ROWS": "512",
    "THINKSTEER_RUN_ATTN": "tiles",
}
# The hybrid step goes gate first when B·C > 64 (src/cuda/hybrid.rs GATE_FIRST_ROWS; the bench's
# C = 10 coefficients).
GATE_FIRST_ROWS, BENCH_C = 64, 10
NOISE, HARM = 0.985, 1.02


def parse_vars(text):
    return dict(v.split("=", 1) for v in text.split())


def args_key(args, drop=("--batch",)):
    """The bench arguments without the flags in `drop` (and their values), each flag with its
    value, sorted."""
    pairs, i = [], 0
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        i += 2 if value is not None else 1
        if flag not in drop:
            pairs.append(flag if value is None else f"{flag} {value}")
    return " ".join(sorted(pairs))


def rows_of(r):
    """Rows of the product calls: the prompt for prefill (a 2,000-token prompt runs in 512-row
    calls, past every threshold), the batch for decode; the hybrid step runs the batch and the
    batch's candidate rows (C + 1 per problem); the host-driven loop (hybrid-w) the batch and,
    on steered steps, runs of C · (1 + 15 + 50 + 100) rows per problem (the paper's windows)."""
    if r["phase"] == "prefill":
        return [r["tokens"]]
    if r["phase"] == "hybrid-w":
        return [r["batch"], r["batch"] * BENCH_C * 166]
    return [r["batch"], r["batch"] * (BENCH_C + 1)] if r["phase"] == "hybrid" else [r["batch"]]


def relevant(var, r, s):
    """Whether the switch can change this row's time at all (the others only add noise)."""
    rows = rows_of(r)
    if var == "THINKSTEER_GEMM":
        return any(n >= int(s["THINKSTEER_GEMM_FROM"]) for n in rows)
    if var == "THINKSTEER_GEMM_FROM":  # the values timed: 33 and the default 129
        return any(33 <= n < 129 for n in rows)
    if var == "THINKSTEER_PREFILL_ROWS":
        return r["phase"] == "prefill" and r["tokens"] > 512
    if r["phase"] == "prefill":
        return False
    if var == "THINKSTEER_GATE_FIRST":
        return r["phase"] == "hybrid"
    if var == "THINKSTEER_HYBRID_STREAMS":
        return r["phase"] in ("hybrid", "hybrid-w")
    return True


def setting(rec, override=None):
    """Every switch's value for a recorded row (or for it with `override`): defaults filled in,
    the gate-first rule applied, and "-" for a switch that cannot change the row (so lines that
    differ only there pair)."""
    r, s = rec["row"], dict(DEFAULTS)
    s.update(rec["vars"])
    s.update(override or {})
    if s["THINKSTEER_GATE_FIRST"] == "auto" and r["phase"] == "hybrid":
        s["THINKSTEER_GATE_FIRST"] = "1" if r["batch"] * BENCH_C > GATE_FIRST_ROWS else "0"
    return {k: (v if relevant(k, r, s) else "-") for k, v in s.items()}


def row_key(rec):
    r = rec["row"]
    args = rec["args"]
    if r["phase"] == "prefill":  # the prefill rows do not depend on the decode settings
        args = args_key(args.split(), drop=("--new-tokens",))
    return (rec["shape"], args, r["phase"], r["batch"], r["tokens"] if r["phase"] == "prefill" else 0)


def cells(r):
    """A row's % of the floor (of the tensor-core peak for prefill), its ratio to plain decode
    and its steered share, as printed ("" where absent)."""
    pct = "-" if r.get("pct_of_floor") is None else (  # null: a card of unknown peak
        f"{r['pct_of_floor']:.1f}%" + ("TC" if r["phase"] == "prefill" else ""))
    ratio = f"x{r['ratio_to_plain']:.3f}" if r.get("ratio_to_plain") else ""
    steered = f"{100 * r['steered_fraction']:.1f}%" if r.get("steered_fraction") is not None else ""
    return pct, ratio, steered


def line(rec):
    r = rec["row"]
    pct, ratio, steered = cells(r)
    extra = f"  {ratio} of plain" if ratio else ""
    extra += f", {steered} steered" if ratio and steered else ""
    return (f"  {r['shape']:<18} {r['phase']:<8} b{r['batch']:<3} {r['tokens']:>5} tok "
            f"{r['ms_per_token']:>9.3f} ms {r['tok_per_s']:>9.1f} tok/s {pct:>8}{extra}")


def load(path):
    """The records of an ab.jsonl, those with a failed timing left out (they pair with nothing)."""
    recs = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    return [r for r in recs if r["row"]["ms_per_token"] > 0]


def record(out, vars_text, shape, args):
    path = os.path.join(out, "ab.jsonl")
    with open(path, "a") as f:
        for l in sys.stdin:
            if not l.startswith("{"):
                print("  " + l.rstrip())
                continue
            rec = {"vars": parse_vars(vars_text), "shape": shape, "args": args_key(args),
                   "row": json.loads(l)}
            f.write(json.dumps(rec) + "\n")
            print(line(rec))


# Switches decided together: gemm's tile only matters from GEMM_FROM rows.
GROUPS = [("THINKSTEER_ROPE",), ("THINKSTEER_GEMV_WARPS",), ("THINKSTEER_GEMV_ROWS",),
          ("THINKSTEER_GATE_FIRST",), ("THINKSTEER_HYBRID_STREAMS",),
          ("THINKSTEER_GEMM_FROM", "THINKSTEER_GEMM"), ("THINKSTEER_ATTN",),
          ("THINKSTEER_PREFILL_ROWS",), ("THINKSTEER_RUN_ATTN",)]


def extra_vars(rec):
    """Variables of a line that are not switches chosen here (e.g. THINKSTEER_PDL=0): rows pair
    only with rows that set the same."""
    return tuple(sorted((k, v) for k, v in rec["vars"].items() if k not in DEFAULTS))


def pairs_of(recs, group):
    """{value: [(ratio, what)]}: each row whose group value is not the reference, over the row
    of the same key and the same other switches with the reference value (each such pair once).
    The reference is the default (for GATE_FIRST, whose default is a rule: the single pass, 0)."""
    out, seen = {}, set()
    reset = {v: "0" if v == "THINKSTEER_GATE_FIRST" else DEFAULTS[v] for v in group}
    for a in recs:
        sa = setting(a)
        va, ref = tuple(sa[v] for v in group), tuple(setting(a, reset)[v] for v in group)
        others = tuple(sa[k] for k in DEFAULTS if k not in group) + extra_vars(a)
        if va == ref or (va, others, row_key(a)) in seen:
            continue
        for b in recs:
            sb = setting(b)
            if (row_key(b) == row_key(a) and tuple(sb[v] for v in group) == ref
                    and tuple(sb[k] for k in DEFAULTS if k not in group) + extra_vars(b) == others):
                seen.add((va, others, row_key(a)))
                ratio = a["row"]["ms_per_token"] / b["row"]["ms_per_token"]
                with_ = " ".join(f"{k}={v}" for k, v in a["vars"].items() if k not in group)
                what = f"{a['shape']} {a['row']['phase']} b{a['row']['batch']} {a['args']} {with_}".rstrip()
                out.setdefault(va, []).append((ratio, what))
                break
    return out


def untrusted(out):
    """The (switch, value) pairs whose GPU tests failed in this call (OUT/untrusted.env, written
    by gpu-check.sh's switch tests: one VAR=value per line)."""
    path = os.path.join(out, "untrusted.env")
    lines = open(path).read().split() if os.path.exists(path) else []
    return {tuple(l.split("=", 1)) for l in lines if "=" in l}


def choose(out):
    recs = load(os.path.join(out, "ab.jsonl"))
    bad = untrusted(out)
    if bad:
        print("not chosen whatever their times (their GPU tests failed in this call): "
              + " ".join(f"{k}={v}" for k, v in sorted(bad)))
    chosen = {}
    for group in GROUPS:
        pairs = pairs_of(recs, group)
        if not pairs:
            continue
        print(" ".join(f"{v} (default {DEFAULTS[v]})" for v in group) + ":")
        wins, worsts = {}, {}
        for value, rs in sorted(pairs.items()):
            gm = math.exp(sum(math.log(r) for r, _ in rs) / len(rs))
            worst, best = max(r for r, _ in rs), min(r for r, _ in rs)
            worsts[value] = worst
            win = gm < NOISE and worst <= HARM
            lose = gm > 1 / NOISE and best >= 1 / HARM
            print(f"  {'/'.join(value)}: geometric mean x{gm:.3f} of the reference over {len(rs)} "
                  f"pairs, worst x{worst:.3f} -> {'faster' if win else 'slower' if lose else 'no clear gain'}")
            for r, what in rs:
                print(f"    x{r:.3f}  {what}")
            failed = [f"{k}={v}" for k, v in zip(group, value) if (k, v) in bad]
            if failed:
                print(f"    not chosen: the GPU tests failed with {' '.join(failed)}")
                win = False
            if win:
                wins[value] = gm
            if lose and group == ("THINKSTEER_GATE_FIRST",):
                chosen["THINKSTEER_GATE_FIRST"] = "0"  # gate first slower everywhere measured
        if group == ("THINKSTEER_GEMM_FROM", "THINKSTEER_GEMM"):
            # The tile from the prefill rows (where GEMM_FROM does not matter), unless it lost on
            # the hybrid step's candidate rows at the default GEMM_FROM; then GEMM_FROM=33 only
            # where it won with that tile.
            tiles = {v[1]: g for v, g in wins.items() if v[0] == "-" and
                     all(w <= HARM for u, w in worsts.items() if u == ("129", v[1]))}
            tile = min(tiles, key=tiles.get) if tiles else DEFAULTS["THINKSTEER_GEMM"]
            if tile != DEFAULTS["THINKSTEER_GEMM"]:
                chosen["THINKSTEER_GEMM"] = tile
            if any(v[0] != "-" and v[1] in (tile, "-") for v in wins):
                chosen["THINKSTEER_GEMM_FROM"] = "33"
            elif any(v[0] != "-" for v in wins):
                print("  (GEMM_FROM=33 won only with another tile than prefill's: not chosen)")
        elif wins:
            chosen[group[0]] = min(wins, key=wins.get)[0]
    text = " ".join(f"{k}={v}" for k, v in chosen.items())
    with open(os.path.join(out, "best.env"), "w") as f:
        f.write(text + "\n")
    print(f"chosen: {text or '(the defaults)'}")


def compare(out):
    """The rows recorded with the chosen switches (OUT/best/ab.jsonl) against this call's A/B
    rows of the defaults with the same key: the check that the switches chosen one by one are
    not slower together. Says so when a row is slower by more than HARM."""
    defaults = {}
    for r in load(os.path.join(out, "ab.jsonl")):
        if not extra_vars(r) and setting(r) == setting(r, DEFAULTS):
            defaults.setdefault(row_key(r), r["row"]["ms_per_token"])
    print("== the chosen switches against the defaults (A/B rows of this call)")
    worse = 0
    for rec in load(os.path.join(out, "best", "ab.jsonl")):
        base = defaults.get(row_key(rec))
        if base:
            ratio = rec["row"]["ms_per_token"] / base
            worse += ratio > HARM
            flag = "  SLOWER" if ratio > HARM else ""
            print(f"  x{ratio:.3f}  {rec['shape']} {rec['row']['phase']} b{rec['row']['batch']} {rec['args']}{flag}")
    if worse:
        print(f"  {worse} rows slower with the chosen switches: do not adopt them as they are")


def summary(out, label, files):
    rows = []
    for f in files:
        p = os.path.join(out, f)
        if os.path.exists(p):
            # bench --json rows, or records holding them (gpu-ab.py record)
            rows += [json.loads(l).get("row", json.loads(l)) for l in open(p) if l.startswith("{")]
    hf = {}
    p = os.path.join(out, "hf.log")
    if os.path.exists(p):
        for l in open(p):
            if l.startswith("RESULTS "):
                hf = json.loads(l[8:])
    # The HF anchor's row for our batch-1 rows (same call): plain generate and the two-model loop.
    peer = {("qwen2.5-1.5b", "decode"): "hf_generate_qwen1.5b",
            ("llama-3.1-8b", "decode"): "hf_generate_llama8b",
            ("qwen2.5-1.5b pair", "hybrid"): "hf_hybrid_loop_qwen1.5b_x2"}
    print(f"== summary{label}")
    copy = {}  # card -> the copy rates its bench processes measured (each row's floor)
    for r in rows:
        copy.setdefault(r.get("card", "?"), []).append(r.get("floor_gb_per_s", 0))
    for card, rates in sorted(copy.items()):
        print(f"card: {card}; floor at its measured copy rate, {min(rates):.0f}-{max(rates):.0f} GB/s")
    print(f"{'shape':<19} {'phase':<8} {'batch':>5} {'tokens':>6} {'ms/token':>9} {'tok/s':>9} "
          f"{'GB/s':>7} {'% floor':>8} {'vs plain':>8} {'steered':>7} {'vs HF':>7}")
    for r in rows:
        pct, ratio, steered = cells(r)
        name = peer.get((r["shape"], r["phase"])) if r["batch"] == 1 and r["tokens"] > 32 else None
        vs_hf = f"{r['tok_per_s'] / hf[name]:.1f}x" if name and hf.get(name) else ""
        print(f"{r['shape']:<19} {r['phase']:<8} {r['batch']:>5} {r['tokens']:>6} "
              f"{r['ms_per_token']:>9.3f} {r['tok_per_s']:>9.1f} {r['gb_per_s']:>7.0f} {pct:>8} "
              f"{ratio:>8} {steered:>7} {vs_hf:>7}")
    if hf:
        print("HF anchor (same call):", json.dumps(hf))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "record" and len(sys.argv) >= 5:
        record(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif cmd == "choose" and len(sys.argv) == 3:
        choose(sys.argv[2])
    elif cmd == "compare" and len(sys.argv) == 3:
        compare(sys.argv[2])
    elif cmd == "summary" and len(sys.argv) >= 4:
        summary(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
