"""The protocol's report: the summary line of the final runs, report.json, report.md and
report.png (the selection accuracies and the final runs), and the picked cell drawn as
normal.png and reduce.png.

- :func:`summary`: mean and sample std of the final runs' test errors, and the line saying it.
- :func:`write_report`: every report file, from the report dict that ``Protocol.run`` returns.
- :func:`plot`: report.png.
- :func:`write_text`: a file written whole or not at all.

Called by scripts/protocol.py; it reads the report dict only, never a run's folder, so the same
results always give the same bytes (tests/test_protocol_report.py holds them to golden files).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
from typing import Any


def summary(errors: list[float], n_runs: int, paper: str | None, dataset: str) -> dict[str, Any]:
    """Mean and sample std (n - 1) of the final runs' test errors, and the line that says it."""
    n = len(errors)
    mean = statistics.mean(errors) if n else None
    std = statistics.stdev(errors) if n > 1 else None
    ref = f"paper: {paper}" if paper else f"no paper figure for {dataset}"
    if n == 0:
        line = f"Test error: no final run finished, 0 of {n_runs} ({ref})"
    elif n == 1:
        line = f"Test error = {mean:.2f} % over 1 run, std undefined with one run ({ref})"
    else:
        line = f"Test error = {mean:.2f} ± {std:.2f} % over {n} runs ({ref})"
    if 0 < n < n_runs:
        line += f" -- PARTIAL: {n_runs - n} of the {n_runs} final runs failed"
    result = {"n": n, "n_runs": n_runs, "partial": n < n_runs, "mean_error": mean}
    return {**result, "std_error": std, "paper": paper, "line": line}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def write_text(path: str, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never half of it: a reader (or a
    protocol resumed after a crash) finds whole files only."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _table(title: str, *header: str) -> list[str]:
    return ["", f"## {title}", "", _row(*header), _row(*["---"] * len(header))]


def write_report(root: str, rep: dict[str, Any], select_seed: int) -> None:
    """report.json, report.md, report.png and the picked cell (normal.png, reduce.png) in
    ``root``; ``select_seed``: the seed of every selection run, which report.md states."""
    import genotypes as gt
    import visualize

    write_text(os.path.join(root, "report.json"), json.dumps(rep, indent=2) + "\n")
    p, pick, s = rep["protocol"], rep["picked"], rep["summary"]
    seeds = lambda ks: ", ".join(f"search-{k}" for k in ks)  # noqa: E731
    failed = lambda r: f"**{r['error']}**"  # noqa: E731
    md = [
        f"# DARTS protocol `{p['name']}` on {p['dataset']}",
        "",
        f"- {p['searches']} searches (seeds 1..{p['searches']}): "
        f"`search.py {shlex.join(p['search_args'])}`",
        f"- selection: each distinct genotype trained from scratch for {p['select_epochs']} "
        f"epochs (seed {select_seed}), scored by its final top-1 on {p['select_val_portion']:g} "
        f"of the training set held out (`--no_test`: the test set is never opened); a tie goes "
        f"to the lowest search seed",
        f"- {p['final_runs']} final runs (seeds 1..{p['final_runs']}): "
        f"`augment.py {shlex.join(p['augment_args'])}`",
    ]
    md += _table("Searches", "search", "genotype", "selection run", "val top1")
    for r in rep["searches"]:
        cell = f"`{r['genotype']}`" if r["ok"] else failed(r)
        md.append(_row(r["run"], cell, r["selection"] or "-", _pct(r["val_top1"])))
    md += _table("Selection", "run", "found by", "val top1")
    for r in rep["selection"]:
        md.append(
            _row(r["run"], seeds(r["searches"]), _pct(r["val_top1"]) if r["ok"] else failed(r))
        )
    md += [""]
    for r in rep["selection"]:
        if len(r["searches"]) > 1:
            md += [
                f"{seeds(r['searches'])} found the same genotype, trained once ({r['run']}).",
                "",
            ]
    if pick is None:
        md += ["**No cell was picked: no selection run finished.**"]
    else:
        md += [
            f"**Picked:** the cell of {seeds(pick['searches'])} ({pick['run']}, val top1 "
            f"{_pct(pick['val_top1'])}, among {pick['among']}).",
            "",
            f"`{pick['genotype']}`",
            "",
        ]
        if pick["tied_with"]:
            md += [
                f"Tied with {', '.join(pick['tied_with'])}: the lowest search seed is picked.",
                "",
            ]
        if visualize.dot_available():
            visualize.plot_genotype(gt.from_str(pick["genotype"]), root)
            md += ["![normal cell](normal.png) ![reduction cell](reduce.png)"]
        else:
            md += ["(graphviz's `dot` is not installed: the cell is not drawn)"]
    md += _table("Final runs", "run", "seed", "test top1", "test error")
    for r in rep["final"]:
        cells = [_pct(r["test_top1"]), f"{r['test_error']:.2f} %"] if r["ok"] else [failed(r), ""]
        md.append(_row(r["run"], r["seed"], *cells))
    md += _table("Time", "stage", "wall time", "its runs' epoch times, summed")
    for st, t in rep["time"].items():
        md.append(_row(st, f"{t['wall_s']:.0f} s", f"{t['runs_s']:.0f} s"))
    md += ["", "Wall times add up the protocol's invocations (--resume).", ""]
    if plot(rep, os.path.join(root, "report.png")):
        md += ["![selection accuracies and final runs](report.png)", ""]
    write_text(os.path.join(root, "report.md"), "\n".join([*md, s["line"]]) + "\n")


def plot(rep: dict[str, Any], out: str) -> bool:
    """The selection accuracies (the picked one in orange) and the final runs' test errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rep["selection"] if r["ok"]]
    errors, s = [r["test_error"] for r in rep["final"] if r["ok"]], rep["summary"]
    if not sel:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["tab:orange" if r["run"] == rep["picked"]["run"] else "tab:blue" for r in sel]
    a.bar([r["run"] for r in sel], [100 * r["val_top1"] for r in sel], color=colors)
    a.set(title="Selection (orange: picked)", ylabel="val top-1 (%)")
    b.plot([0.0] * len(errors), errors, "o", alpha=0.6)
    if s["mean_error"] is not None:
        b.axhline(s["mean_error"], color="k", label=f"mean {s['mean_error']:.2f} %")
    if s["std_error"] is not None:
        m, sd = s["mean_error"], s["std_error"]
        b.axhspan(m - sd, m + sd, color="k", alpha=0.1, label=f"± std {sd:.2f}")
    b.set(title=f"Final runs ({s['n']} of {s['n_runs']})", ylabel="test error (%)", xticks=[])
    if errors:
        b.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True
