"""
Pools the runs of prompt_distill.py into the tables of MEASUREMENTS.md: each run's scores, the
distilled-minus-SFT difference per document and seed (mean and standard error), and the gold questions
binned by how many training pairs state their answer.

    python pool.py runs/lake_town_s0_distill runs/lake_town_s0_sft ...

A run is a folder with report.json and qa.jsonl; where `<folder>.err` holds the output of
`/usr/bin/time -v`, its wall time and peak memory are shown too.
"""

import json
import math
import os
import re
import sys

from prompt_distill import is_correct, print_table


def wall_and_peak(folder: str) -> tuple[str, str]:
    try:
        text = open(folder.rstrip("/") + ".err").read()
    except OSError:
        return "", ""
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", text)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return (wall.group(1).split(".")[0] if wall else ""), (f"{int(peak.group(1)) / 2**20:.2f}" if peak else "")


def load(folder: str) -> dict:
    report = json.load(open(os.path.join(folder, "report.json")))
    name = next(k for k in report["accuracy"] if k not in ("closed_book", "open_book"))
    pairs = [json.loads(line) for line in open(os.path.join(folder, "qa.jsonl"))]
    trained = [(p["question"], p["answer"]) for p in pairs if not p["held_out"]]
    forgot = report["forgetting"]
    n_general = len(report["general_answers"])
    return {
        "folder": folder, "doc": "+".join(os.path.splitext(os.path.basename(d["path"]))[0] for d in report["documents"]),
        "seed": report["settings"]["seed"], "method": report["settings"]["method"], "name": name,
        "golds": [e["answers"] for e in report["eval"]],
        "adapted": [is_correct(e[name], e["answers"]) for e in report["eval"]],
        "open": [is_correct(e["open_book"], e["answers"]) for e in report["eval"]],
        "stating": [sum(is_correct(a, e["answers"]) and not is_correct(q, e["answers"]) for q, a in trained)
                    for e in report["eval"]],
        "retention": round(forgot["retention_adapted"] * n_general), "general": n_general,
        "leaks": round(forgot["leakage_adapted"] * n_general), "drift": forgot["drift"],
        "pairs": len(trained), "time": wall_and_peak(folder),
    }


def main() -> None:
    runs = [load(folder) for folder in sys.argv[1:]]
    rows = [("run", "doc", "seed", "method", "right", "open book", "retention", "leaks", "drift", "pairs",
             "wall", "peak GiB")]
    for r in runs:
        rows.append((os.path.basename(r["folder"].rstrip("/")), r["doc"], r["seed"], r["method"],
                     f"{sum(r['adapted'])}/{len(r['golds'])}", sum(r["open"]), f"{r['retention']}/{r['general']}",
                     r["leaks"], f"{r['drift']:.4f}", r["pairs"], *r["time"]))
    print_table(rows)

    for method in sorted({r["method"] for r in runs}):
        mine = [r for r in runs if r["method"] == method]
        right, opened = (sum(sum(r[k]) for r in mine) for k in ("adapted", "open"))
        gold = sum(len(r["golds"]) for r in mine)
        print(f"\n{method}: {right} of {gold} ({right / max(1, opened):.2f} of open book's {opened}); retention "
              f"{sum(r['retention'] for r in mine)} of {sum(r['general'] for r in mine)}; "
              f"leaks {sum(r['leaks'] for r in mine)}; drift {min(r['drift'] for r in mine):.3f}-"
              f"{max(r['drift'] for r in mine):.3f}")

    by_key = {(r["doc"], r["seed"], r["method"]): r for r in runs}
    diffs = [sum(r["adapted"]) - sum(by_key[(r["doc"], r["seed"], "sft")]["adapted"])
             for r in runs if r["method"] == "distill" and (r["doc"], r["seed"], "sft") in by_key]
    if len(diffs) > 1:
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        print(f"\ndistilled minus SFT per run: {diffs}; mean {mean:+.2f}, standard error {se:.2f}")

    print("\ngold questions by the training pairs that state their answer (all runs)")
    rows = [("pairs stating", "questions", "open book", *sorted({r["method"] for r in runs}))]
    for low, high, label in ((0, 0, "0"), (1, 2, "1-2"), (3, 5, "3-5"), (6, math.inf, "6 or more")):
        picked = {m: [(r, i) for r in runs if r["method"] == m for i, n in enumerate(r["stating"]) if low <= n <= high]
                  for m in rows[0][3:]}
        first = picked[rows[0][3]]
        rows.append((label, len(first), sum(r["open"][i] for r, i in first),
                     *(sum(r["adapted"][i] for r, i in picked[m]) for m in rows[0][3:])))
    print_table(rows)


if __name__ == "__main__":
    main()
