"""``sat-eval``: score captions.jsonl against references (BLEU, CIDEr-D, attention grounding), or compare two runs."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from sat_export.cli.common import new_app, user_errors
from sat_export.errors import UsageError
from sat_export.text import printable
from training.console import make_console

app = new_app()
SHOWN = 10  # names printed per list; --json and --html have them all


@app.command()
@user_errors
def main(
    pred: str = typer.Option(None, help="sat-infer output: captions.jsonl, or per-shard Parquet results (a .parquet "
                             "file, their folder or URL prefix; alphas inside)."),
    refs: Path = typer.Option(None, help="References: captions.txt, Flickr8k.token.txt, dataset_*.json, or their folder."),
    split: str = typer.Option(None, help="Score only this split of the references: train, val or test (default: all)."),
    images: Path = typer.Option(None, help="Image folder of the references (default: next to --refs)."),
    boxes: Path = typer.Option(None, help="boxes.json (image -> word -> pixel boxes x0 y0 x1 y1): score attention grounding."),
    alphas: Path = typer.Option(None, help="Folder of <image>.npz attention files (default: each row's 'alphas')."),
    model: str = typer.Option(None, help="Checkpoint or bundle that made the captions, for its crop "
                                         "(grounding, overlays); default: the embedded demo model."),
    compare: tuple[Path, Path] = typer.Option(None, help="Compare two captions files A B instead: B scored against A."),
    json_out: Path = typer.Option(None, "--json", help="Write the full report (every name, every image) as JSON."),
    html: Path = typer.Option(None, help="Write a static HTML report with a gallery of attention overlays."),
    gallery: int = typer.Option(24, min=0, help="Images in the HTML gallery."),
):
    """Score captions against references: corpus BLEU-1..4 (nltk), CIDEr-D (COCO) and attention grounding.

    Error rows, predictions without a reference and references without a prediction are counted and named, never dropped; an empty caption is scored as wrong.

    Example:  sat-eval --pred captions.jsonl --refs data/shapes/captions.txt --split test --boxes data/shapes/boxes.json --html report.html

    Example:  sat-eval --compare captions.onnx.jsonl captions.int8.jsonl
    """
    from sat_export.registry import model_config
    from sat_export.reports.evaluate import compare as compare_runs
    from sat_export.reports.evaluate import evaluate
    from sat_export.reports.html import write_html

    preprocess = None
    if compare is not None:
        if pred or refs:
            raise UsageError("--compare takes two captions files on its own; drop --pred/--refs")
        report = compare_runs(*compare)
    elif pred is None or refs is None:
        raise UsageError("pass --pred and --refs (or --compare A.jsonl B.jsonl); see sat-eval --help")
    else:
        preprocess = model_config(model).preprocess if boxes or html else None
        report = evaluate(pred, refs, split, images, boxes, alphas, preprocess)
    print_report(report)
    if json_out:
        # backslashreplace: an undecodable file name byte becomes its JSON escape, as in the rows
        json_out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8",
                            errors="backslashreplace")
    if html:
        write_html(report, html, preprocess, gallery)


def print_report(report: dict) -> None:
    """Metrics and counts as a table on stdout; the first names of every non-empty list after it."""
    from sat_export.reports.html import LABELS, LISTS

    out = make_console(stderr=False)
    table = Table(show_header=False, box=None)
    for key, value in report["metrics"].items():
        table.add_row(LABELS[key], f"{value:.4f}")
    for key, value in (report.get("grounding") or {}).items():
        table.add_row(LABELS[key], "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
    for key, value in report["counts"].items():
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)
    for key, heading in LISTS.items():
        items = report.get(key) or []
        if items:
            out.print(f"{heading} ({len(items)}):", highlight=False)
            for item in items[:SHOWN]:
                line = f"{item['image']}: {item.get('reason') or item.get('error')}" if isinstance(item, dict) else item
                out.print(f"  {printable(line)}", highlight=False, markup=False)
            if len(items) > SHOWN:
                out.print(f"  ... and {len(items) - SHOWN} more (see --json)", highlight=False)


if __name__ == "__main__":
    app()
