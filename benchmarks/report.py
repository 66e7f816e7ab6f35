"""What a bench run shows: the JSON document, the rich table, the verdict and the PNG plot.

Every figure comes from ``BenchResult``: per configuration and batch size the median and p90
latency of a batch (end to end), images/s (batch / median), the medians of the encoder and decode
loop parts, the peak RSS, and the speed-up against PyTorch eager fp32 from the same run.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.bench import BenchResult, Row, Timing
from benchmarks.configs import BASELINE

AGREEMENT_TARGET = 0.97  # a configuration counts as faithful at or above this share of identical captions


def batch_stats(timings: list[Timing], size: int) -> dict:
    """Median/p90 latency (ms), images/s, encoder and decode medians, peak RSS, and every run."""
    ms = {part: [1000 * getattr(t, part) for t in timings] for part in ("total", "encoder", "decode")}
    median = float(np.median(ms["total"]))
    return {"latency_ms": {"median": round(median, 2), "p90": round(float(np.percentile(ms["total"], 90)), 2)},
            "images_per_s": round(size / median * 1000, 2),
            "encoder_ms": round(float(np.median(ms["encoder"])), 2), "decode_ms": round(float(np.median(ms["decode"])), 2),
            "peak_rss_mb": round(max(t.peak_rss_mb for t in timings)),
            "runs_ms": [round(v, 2) for v in ms["total"]], "encoder_runs_ms": [round(v, 2) for v in ms["encoder"]],
            "decode_runs_ms": [round(v, 2) for v in ms["decode"]]}


def _row_doc(row: Row, n_images: int) -> dict:
    c = row.config
    doc = {"key": c.key, "label": c.label, "runtime": c.runtime, "precision": c.precision, "device": c.device,
           "options": {k: str(v) for k, v in c.options.items()}, "status": row.status, "backend": row.description,
           "setup_s": _round(row.setup_s), "first_batch_s": _round(row.first_batch_s),
           "load_rss_mb": _round(row.load_rss_mb, 0), "agreement": _round(row.agreement, 4),
           "agreement_images": n_images if row.agreement is not None else None, "bleu4": _round(row.bleu4, 4),
           "batches": {str(size): batch_stats(t, size) for size, t in sorted(row.timings.items()) if t}}
    return doc


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def document(result: BenchResult, seconds: dict) -> dict:
    """The JSON document: context (machine, libraries, model, images, options), rows, verdict."""
    rows = [_row_doc(r, result.images["n"]) for r in result.rows]
    _add_speedups(rows)
    _add_ceiling_shares(rows, result.ceilings)
    return {"tool": "sat-bench", "format_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["sat-bench", *sys.argv[1:]]), "seconds": seconds, **result.environment,
            "model": {**result.model.info, "bundle": str(result.model.bundle)}, "images": result.images,
            "options": asdict(result.options), "ceilings": result.ceilings, "rows": rows,
            "summary": verdict(rows, max(result.options.batch_sizes), result.ceilings)}


def _add_speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["key"] == BASELINE.key), None)
    for row in rows:
        for size, stats in row["batches"].items():
            ref = base["batches"].get(size) if base else None
            stats["speedup_vs_eager"] = (round(ref["latency_ms"]["median"] / stats["latency_ms"]["median"], 2)
                                         if ref else None)


def _add_ceiling_shares(rows: list[dict], ceilings: dict) -> None:
    """Encoder GMAC/s of every CPU row and its share of the GEMM rate of the row's precision."""
    macs, rates = ceilings.get("encoder_macs_per_image"), ceilings.get("gemm_gmac_s", {})
    for row in rows:
        gemm = rates.get(row["precision"]) if row["device"] == "cpu" else None
        for size, stats in row["batches"].items():
            rate = macs * int(size) / stats["encoder_ms"] / 1e6 if macs and stats["encoder_ms"] else None
            stats["encoder_gmac_s"] = _round(rate, 1)
            stats["encoder_share_of_gemm"] = _round(rate / gemm, 3) if rate and gemm else None


def verdict(rows: list[dict], batch: int, ceilings: dict | None = None) -> dict:
    """At the reference batch: fastest faithful configuration against eager and the best PyTorch option.

    With ``ceilings``: the speed-up over the best PyTorch option an int8 encoder running at the
    machine's int8 GEMM rate would reach, keeping that option's decode loop (an estimate, not a
    measurement).
    """
    def median(row):
        return row["batches"][str(batch)]["latency_ms"]["median"]

    timed = [r for r in rows if str(batch) in r["batches"]]
    base = next((r for r in timed if r["key"] == BASELINE.key), None)
    torch_rows = [r for r in timed if r["runtime"] == "torch" and r["device"] == "cpu"]
    faithful = [r for r in timed if (r["agreement"] or 0) >= AGREEMENT_TARGET]
    ort = next((r for r in timed if r["key"] == "ort-fp32"), None)
    if base is None:
        return {"batch": batch, "note": "no baseline (PyTorch eager fp32) figures: no ratios"}
    best_torch = min(torch_rows, key=median)
    fastest = min(faithful, key=median) if faithful else None
    out = {"batch": batch, "agreement_target": AGREEMENT_TARGET, "best_torch": best_torch["key"],
           "best_torch_agreement": best_torch["agreement"], "eager_bleu4": base["bleu4"]}
    if fastest is not None:
        out.update(fastest_faithful=fastest["key"], fastest_faithful_agreement=fastest["agreement"],
                   fastest_faithful_bleu4=fastest["bleu4"], speedup_vs_eager=round(median(base) / median(fastest), 2),
                   speedup_vs_best_torch=round(median(best_torch) / median(fastest), 2))
    ceilings = ceilings or {}
    int8_rate = ceilings.get("gemm_gmac_s", {}).get("int8")
    if int8_rate and ceilings.get("encoder_macs_per_image"):
        encoder_ms = ceilings["encoder_macs_per_image"] * batch / int8_rate / 1e6
        at_rate_ms = encoder_ms + best_torch["batches"][str(batch)]["decode_ms"]
        out.update(gemm_gmac_s=ceilings["gemm_gmac_s"],
                   int8_at_gemm_rate_vs_best_torch=round(median(best_torch) / at_rate_ms, 2))
    if ort is not None:
        out.update(ort_fp32_speedup_vs_eager=round(median(base) / median(ort), 2),
                   ort_fp32_identical=ort["agreement"] == 1.0)
    return out


def print_table(doc: dict, console: Console) -> None:
    """One line per configuration and batch size; a row that did not run gets one line, its status below."""
    table = Table(title=f"sat-bench: {doc['images']['n']} images {doc['images']['size'][0]}x{doc['images']['size'][1]}, "
                        f"beam {doc['options']['beam']}, {doc['machine']['cpu']} ({doc['machine']['usable_cores']} cores)")
    for name in ("configuration", "status", "batch", "median ms", "p90 ms", "img/s", "x eager", "encoder ms",
                 "enc % GEMM", "decode ms", "peak RSS MB", "agreement", "BLEU-4"):
        table.add_column(name, justify="left" if name in ("configuration", "status") else "right")
    for row in doc["rows"]:
        agree = "" if row["agreement"] is None else f"{row['agreement']:.1%}"
        bleu = "" if row["bleu4"] is None else f"{row['bleu4']:.3f}"
        status = row["status"].split(":")[0]
        if not row["batches"]:
            table.add_row(row["key"], status, *[""] * 9, agree, bleu)
        for size, s in row["batches"].items():
            table.add_row(row["key"], status, size, f"{s['latency_ms']['median']:.1f}",
                          f"{s['latency_ms']['p90']:.1f}", f"{s['images_per_s']:.1f}",
                          "" if s["speedup_vs_eager"] is None else f"{s['speedup_vs_eager']:.2f}",
                          f"{s['encoder_ms']:.1f}", "" if s["encoder_share_of_gemm"] is None
                          else f"{s['encoder_share_of_gemm']:.0%}", f"{s['decode_ms']:.1f}", str(s["peak_rss_mb"]), agree, bleu)
    console.print(table)
    for row in doc["rows"]:
        if row["status"] != "ok":
            console.print(f"{row['key']}: {row['status']}", highlight=False, soft_wrap=True)
    for line in verdict_lines(doc["summary"]):
        console.print(line, highlight=False, soft_wrap=True)


def verdict_lines(summary: dict) -> list[str]:
    if "note" in summary:
        return [summary["note"]]
    lines = []
    if "fastest_faithful" in summary:
        lines.append(f"fastest configuration with >= {summary['agreement_target']:.0%} caption agreement at batch "
                     f"{summary['batch']}: {summary['fastest_faithful']} ({summary['fastest_faithful_agreement']:.1%}): "
                     f"{summary['speedup_vs_eager']:.2f}x eager fp32, {summary['speedup_vs_best_torch']:.2f}x the best "
                     f"PyTorch option ({summary['best_torch']})")
    if "ort_fp32_speedup_vs_eager" in summary:
        lines.append(f"onnxruntime fp32: {summary['ort_fp32_speedup_vs_eager']:.2f}x eager fp32, captions "
                     f"{'identical' if summary['ort_fp32_identical'] else 'NOT identical'}")
    if "int8_at_gemm_rate_vs_best_torch" in summary:
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in summary["gemm_gmac_s"].items() if v)
        lines.append(f"GEMM rates here (GMAC/s): {peaks}; an int8 encoder at the int8 rate would make the batch "
                     f"about {summary['int8_at_gemm_rate_vs_best_torch']:.2f}x the best PyTorch option")
    if summary.get("eager_bleu4") is not None:
        lines.append(f"held-out BLEU-4 of the model (eager fp32): {summary['eager_bleu4']:.3f}")
    return lines


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def write_plot(doc: dict, path: Path) -> str:
    """Images/s per configuration and batch size, and the encoder/decode split at the largest batch.

    Returns what was done, for the console: matplotlib is optional (the ``[plot]`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no plot: matplotlib is not installed (pip install -e '.[plot]'); {path} not written"
    rows = [r for r in doc["rows"] if r["batches"]]
    sizes = sorted({int(s) for r in rows for s in r["batches"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(sizes), 1)
    for i, size in enumerate(sizes):
        ax1.bar([k + i * width for k in range(len(rows))],
                [r["batches"].get(str(size), {}).get("images_per_s", 0) for r in rows], width, label=f"batch {size}")
    ax1.set_xticks([k + width * (len(sizes) - 1) / 2 for k in range(len(rows))], [r["key"] for r in rows],
                   rotation=30, ha="right")
    ax1.set_ylabel("images / s (end to end)")
    ax1.legend()
    big = str(max(sizes))
    enc = [r["batches"].get(big, {}).get("encoder_ms", 0) / int(big) for r in rows]
    dec = [r["batches"].get(big, {}).get("decode_ms", 0) / int(big) for r in rows]
    ax2.bar(range(len(rows)), enc, label="encoder")
    ax2.bar(range(len(rows)), dec, bottom=enc, label="decode loop")
    labels = [r["key"] + ("" if r["agreement"] is None else f"\n{r['agreement']:.0%} agree") for r in rows]
    ax2.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax2.set_ylabel(f"ms per image at batch {big}")
    ax2.legend()
    fig.suptitle(f"sat-bench on {doc['machine']['cpu']} ({doc['machine']['usable_cores']} cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
