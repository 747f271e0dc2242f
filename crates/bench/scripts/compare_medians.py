#!/usr/bin/env python3
"""Medians over several `shoal-bench compare` result files, as a Markdown table.

    python3 crates/bench/scripts/compare_medians.py [--max-others 10] run1.json run2.json ...

A scenario of one target in one run counts only when other processes used at most
--max-others percent of the machine during it (its "other processes" figure); runs that
do not count are listed with a `*`. The ratio is that of the medians, in the direction
of the figure (how many times better Shoal is). Below the table, for each rate (a figure
in /s), the ratio of every run in which both targets count, and their median: on a host
whose speed moves between the two targets' phases, the two medians can differ.
"""

import argparse
import json
import statistics


def fmt(v):
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}".replace(",", " ")
    if a >= 100 or a == int(a):
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(better, r, s):
    if r is None or s is None:
        return ""
    if better == "higher" and r > 0:
        return f"{s / r:.2f}x"
    if better == "lower":
        if s == 0 and r == 0:
            return "="
        if s == 0 or r / s > 100:
            return ">100x"
        return f"{r / s:.2f}x"
    return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-others", type=float, default=10.0)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    runs = [json.load(open(f)) for f in args.files]
    keys = []
    values = {}  # (target, scenario, metric) -> list of (run index, value, counts)
    meta = {}
    for i, run in enumerate(runs):
        for tr in run["runs"]:
            others = {
                f["scenario"]: f["value"]
                for f in tr["figures"]
                if f["metric"] == "other processes"
            }
            for f in tr["figures"]:
                key = (f["scenario"], f["metric"])
                if f["metric"] == "other processes":
                    continue
                if key not in meta:
                    keys.append(key)
                    meta[key] = (f["unit"], f["better"], f.get("note"))
                o = others.get(f["scenario"])
                counts = o is None or o <= args.max_others
                values.setdefault((tr["target"],) + key, []).append((i + 1, f["value"], counts, o))
    print("| scenario | metric | unit | rnacos median (runs) | Shoal median (runs) | Shoal vs rnacos |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key in keys:
        unit, better, note = meta[key]
        cells = []
        medians = []
        for target in ("rnacos", "shoal"):
            vals = values.get((target,) + key, [])
            good = [v for (_, v, c, _) in vals if c and v is not None]
            med = statistics.median(good) if good else None
            medians.append(med)
            runs_text = " / ".join(
                (fmt(v) if v is not None else "n/a") + ("" if c else f"* ({fmt(o)} %)")
                for (_, v, c, o) in vals
            )
            if not vals:
                cells.append("-")
            elif med is None and all(v is None for (_, v, _, _) in vals):
                cells.append("n/a")
            else:
                cells.append(f"**{fmt(med)}** ({runs_text})")
        print(
            f"| {key[0]} | {key[1]} | {unit} | {cells[0]} | {cells[1]} | "
            f"{ratio(better, medians[0], medians[1])} |"
        )
    print()
    for key in keys:
        unit, better, _ = meta[key]
        if unit != "/s" or better != "higher":
            continue
        by_run = {
            target: {i: v for (i, v, c, _) in values.get((target,) + key, []) if c and v}
            for target in ("rnacos", "shoal")
        }
        both = sorted(set(by_run["rnacos"]) & set(by_run["shoal"]))
        if not both:
            continue
        per_run = [by_run["shoal"][i] / by_run["rnacos"][i] for i in both]
        print(
            f"{key[0]}, {key[1]}: per run "
            + ", ".join(f"{r:.2f}" for r in per_run)
            + f" (runs {', '.join(map(str, both))}); median {statistics.median(per_run):.2f}x"
        )


if __name__ == "__main__":
    main()
