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
from benchmarks.configs import BASELINE, emulated
from training.options import FAITHFUL_RATIO


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


def _row_doc(row: Row) -> dict:
    c = row.config
    doc = {"key": c.key, "label": c.label, "runtime": c.runtime, "precision": c.precision, "device": c.device,
           "options": {k: str(v) for k, v in c.options.items()}, "status": row.status, "backend": row.description,
           "batch_profile": list(row.batch_profile) if row.batch_profile else None,
           "setup_s": _round(row.setup_s), "first_batch_s": _round(row.first_batch_s),
           "load_rss_mb": _round(row.load_rss_mb, 0), "emulated": emulated(c),
           "agreement": _round(row.agreement, 4), "agreement_images": len(row.captions) if row.captions else None,
           "accuracy": row.accuracy,
           "batches": {str(size): batch_stats(t, size) for size, t in sorted(row.timings.items()) if t}}
    return doc


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def document(result: BenchResult, seconds: dict) -> dict:
    """The JSON document: context (machine, libraries, model, images, options), rows, verdict."""
    rows = [_row_doc(r) for r in result.rows]
    _add_speedups(rows)
    _add_ceiling_shares(rows, result.ceilings)
    return {"tool": "sat-bench", "format_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["sat-bench", *sys.argv[1:]]), "seconds": seconds, **result.environment,
            "model": {**result.model.info, "bundle": str(result.model.bundle)}, "images": result.images,
            "options": asdict(result.options), "ceilings": result.ceilings, "rows": rows,
            "summary": {**verdict(rows, max(result.options.batch_sizes), result.ceilings),
                        "int8": int8_verdict(rows, result.model.info, result.options.beam)}}


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
        gemm = rates.get(row["precision"]) if row["device"] == "cpu" and not row["emulated"] else None
        for size, stats in row["batches"].items():
            rate = macs * int(size) / stats["encoder_ms"] / 1e6 if macs and stats["encoder_ms"] else None
            stats["encoder_gmac_s"] = _round(rate, 1)
            stats["encoder_share_of_gemm"] = _round(rate / gemm, 3) if rate and gemm else None


def verdict(rows: list[dict], batch: int, ceilings: dict | None = None) -> dict:
    """At the reference batch: the fastest faithful configuration against eager and the best PyTorch option.

    Faithful: the task rule of ``training.faithful`` against eager fp32 on every bench image. With
    ``ceilings``: the speed-ups an int8 encoder running at the machine's int8 GEMM rate would reach,
    keeping the decode loop of the row it is compared with (an estimate, not a measurement).
    """
    def median(row):
        return row["batches"][str(batch)]["latency_ms"]["median"]

    timed = [r for r in rows if str(batch) in r["batches"]]
    base = next((r for r in timed if r["key"] == BASELINE.key), None)
    if base is None:
        return {"batch": batch, "note": "no baseline (PyTorch eager fp32) figures: no ratios"}
    torch_rows = [r for r in timed if r["runtime"] == "torch" and r["device"] == "cpu"]
    faithful = [r for r in timed if r["accuracy"] and r["accuracy"]["faithful"]]
    best_torch, fastest = min(torch_rows, key=median), min(faithful, key=median)
    accuracy = base["accuracy"]
    out = {"batch": batch, "rule": f"BLEU-4 and CIDEr-D >= {FAITHFUL_RATIO:.0%} of eager fp32's on {accuracy['images']} "
                                   "images, same run", "best_torch": best_torch["key"],
           "eager_bleu4": accuracy["bleu4"]["reference"], "eager_cider_d": accuracy["cider_d"]["reference"],
           "fastest_faithful": fastest["key"], "fastest_faithful_agreement": fastest["agreement"],
           "speedup_vs_eager": round(median(base) / median(fastest), 2),
           "speedup_vs_best_torch": round(median(best_torch) / median(fastest), 2),
           "emulated": [r["key"] for r in rows if r["emulated"]]}
    ceilings = ceilings or {}
    int8_rate = ceilings.get("gemm_gmac_s", {}).get("int8")
    if int8_rate and ceilings.get("encoder_macs_per_image"):
        encoder_ms = ceilings["encoder_macs_per_image"] * batch / int8_rate / 1e6

        def at_int8_rate(row: dict) -> float:  # ``row`` with its encoder at the int8 GEMM rate, its own decode loop
            return round(median(row) / (encoder_ms + row["batches"][str(batch)]["decode_ms"]), 2)

        out.update(gemm_gmac_s=ceilings["gemm_gmac_s"], int8_at_gemm_rate_vs_eager=at_int8_rate(base),
                   int8_at_gemm_rate_vs_best_torch=at_int8_rate(best_torch))
    ort = next((r for r in timed if r["key"] == "ort-fp32"), None)
    if ort is not None:
        out.update(ort_fp32_speedup_vs_eager=round(median(base) / median(ort), 2),
                   ort_fp32_identical=ort["agreement"] == 1.0)
    return out


def int8_verdict(rows: list[dict], model_info: dict, beam: int) -> dict:
    """Whether an int8 row is faithful with the run's decoding (``beam``); when none is, why, per int8 row: its
    task metrics' shares of eager's here, and what its int8 search judged (with which decoding) when it was built."""
    int8 = [r for r in rows if r["precision"] == "int8"]
    faithful = [r["key"] for r in int8 if r["accuracy"] and r["accuracy"]["faithful"]]
    searches = {"onnxruntime": model_info.get("int8_search"), "openvino": model_info.get("openvino_int8")}
    why = {} if faithful else {r["key"]: _int8_why(r, searches.get(r["runtime"]), beam) for r in int8}
    return {"beam": beam, "faithful": faithful, "why_not": why}


def _decoding(beam: int) -> str:
    return "greedy" if beam == 1 else f"beam {beam}"


def _int8_why(row: dict, search: dict | None, beam: int) -> str:
    accuracy = row["accuracy"]
    if accuracy is None:
        return f"not judged ({row['status']})"
    text = (f"BLEU-4 {accuracy['bleu4']['ratio']:.1%} and CIDEr-D {accuracy['cider_d']['ratio']:.1%} of eager's "
            f"with {_decoding(beam)} (needs {accuracy['ratio_required']:.0%} each)")
    if search:
        judged = search["verdict"]
        worst = min(judged["bleu4"]["ratio"], judged["cider_d"]["ratio"])
        groups = f", {len(search['excluded_groups'])} groups in fp32" if "excluded_groups" in search else ""
        text += (f"; its int8 encoder was judged with {_decoding(search.get('beam', 1))} on {judged['images']} "
                 f"held-back calibration images: {'faithful' if judged['faithful'] else f'not faithful ({worst:.1%})'}"
                 f"{groups}")
        if search.get("beam", 1) != beam:
            text += f" (rebuild it judged with beam {beam}: sat-export build --int8-beam {beam})"
    return text


def print_table(doc: dict, console: Console) -> None:
    """Timing: one line per configuration and batch size (a row that did not run gets one line, its
    status below; TensorRT rows name the min/opt/max batch their engines were built for). Accuracy: one line per configuration, on every bench image: BLEU-4 and CIDEr-D,
    their difference to eager fp32 with the 95 % paired-bootstrap interval, the task-rule verdict
    and the share of identical captions."""
    images, machine = doc["images"], doc["machine"]
    timing = Table(title=f"sat-bench timing: {images['timing_images']} images {images['size'][0]}x"
                         f"{images['size'][1]}, beam {doc['options']['beam']}, {machine['isa']}, "
                         f"{machine['usable_cores']} cores")
    profiles = any(row.get("batch_profile") for row in doc["rows"])  # TensorRT rows: what their engines were built for
    for name in ("configuration", "status", *(("TRT profile",) if profiles else ()), "batch", "median ms", "p90 ms",
                 "img/s", "x eager", "encoder ms", "enc % GEMM", "decode ms", "peak RSS MB", "faithful"):
        timing.add_column(name, justify="left" if name in ("configuration", "status") else "right")
    accuracy = Table(title=f"sat-bench accuracy: {images['n']} images, references: {images['references']}")
    for name in ("configuration", "BLEU-4", "diff [95% CI]", "CIDEr-D", "diff [95% CI]", "faithful", "identical"):
        accuracy.add_column(name, justify="left" if name == "configuration" else "right")
    for row in doc["rows"]:
        faithful = _faithful(row)
        status = "emulated" if row["status"] == "ok" and row["emulated"] else row["status"].split(":")[0]
        lead = [row["key"], status, *(["/".join(map(str, row.get("batch_profile") or ()))] if profiles else [])]
        if not row["batches"]:
            timing.add_row(*lead, *[""] * 9, faithful)
        for size, s in row["batches"].items():
            share = s["encoder_share_of_gemm"]
            timing.add_row(*lead, size, f"{s['latency_ms']['median']:.1f}",
                           f"{s['latency_ms']['p90']:.1f}", f"{s['images_per_s']:.1f}",
                           "" if s["speedup_vs_eager"] is None else f"{s['speedup_vs_eager']:.2f}",
                           f"{s['encoder_ms']:.1f}", "" if share is None else f"{share:.0%}", f"{s['decode_ms']:.1f}",
                           str(s["peak_rss_mb"]), faithful)
        if row["agreement"] is not None:
            metrics = [row["accuracy"][m] for m in ("bleu4", "cider_d")] if row["accuracy"] else []
            cells = [c for m in metrics for c in (f"{m['candidate']:.3f}",
                                                  f"{m['difference']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]")]
            accuracy.add_row(row["key"], *(cells or ["", "", "", ""]), faithful, f"{row['agreement']:.1%}")
    console.print(timing)
    console.print(accuracy)
    for row in doc["rows"]:
        if row["status"] != "ok" or row["emulated"]:
            console.print(f"{row['key']}: {row['emulated'] or row['status']}", highlight=False, soft_wrap=True)
    for line in verdict_lines(doc["summary"]):
        console.print(line, highlight=False, soft_wrap=True)


def _faithful(row: dict) -> str:
    if row["accuracy"] is not None:
        return "yes" if row["accuracy"]["faithful"] else "no"
    return "not judged" if row["emulated"] and row["agreement"] is not None else ""


def verdict_lines(summary: dict) -> list[str]:
    if "note" in summary:
        return [summary["note"]]
    lines = [f"faithful: {summary['rule']} (eager fp32: BLEU-4 {summary['eager_bleu4']:.3f}, CIDEr-D "
             f"{summary['eager_cider_d']:.3f})",
             f"fastest faithful configuration at batch {summary['batch']}: {summary['fastest_faithful']} "
             f"({summary['fastest_faithful_agreement']:.1%} identical captions): {summary['speedup_vs_eager']:.2f}x "
             f"eager fp32, {summary['speedup_vs_best_torch']:.2f}x the best PyTorch option ({summary['best_torch']})"]
    if "ort_fp32_speedup_vs_eager" in summary:
        lines.append(f"onnxruntime fp32: {summary['ort_fp32_speedup_vs_eager']:.2f}x eager fp32, captions "
                     f"{'identical' if summary['ort_fp32_identical'] else 'NOT identical'}")
    if "int8_at_gemm_rate_vs_best_torch" in summary:
        peaks = ", ".join(f"{k} {'not native' if v is None else f'{v:.0f}'}" for k, v in summary["gemm_gmac_s"].items())
        lines.append(f"GEMM rates here (GMAC/s): {peaks}; an int8 encoder at the int8 rate would make the batch "
                     f"about {summary['int8_at_gemm_rate_vs_eager']:.2f}x eager fp32 and "
                     f"{summary['int8_at_gemm_rate_vs_best_torch']:.2f}x the best PyTorch option (estimate)")
    int8 = summary.get("int8")
    if int8 and (int8["faithful"] or int8["why_not"]):
        lines.append(f"int8 with {_decoding(int8['beam'])}: faithful: {', '.join(int8['faithful'])}" if int8["faithful"]
                     else f"no faithful int8 row with {_decoding(int8['beam'])}: "
                     + "; ".join(f"{key}: {why}" for key, why in int8["why_not"].items()))
    if summary["emulated"]:
        lines.append(f"emulated on this CPU, timed but not judged: {', '.join(summary['emulated'])}")
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
    labels = [r["key"] + ("" if r["accuracy"] is None else f"\n{'faithful' if r['accuracy']['faithful'] else 'unfaithful'}")
              for r in rows]
    ax2.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax2.set_ylabel(f"ms per image at batch {big}")
    ax2.legend()
    fig.suptitle(f"sat-bench on {doc['machine']['isa']} ({doc['machine']['usable_cores']} cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
