"""``sat-eval --html``: one static, offline page — metrics, the named problem lists, and a gallery.

Images and attention overlays are embedded as JPEG data URIs, so the page is a single file that
can be mailed or attached to a CI run. Overlays come from ``sat_export.reports.overlays.overlay``. The page
head, the caption cards and their figures are rendered here for ``sat-infer --overlays``'s gallery
too (``sat_export.reports.gallery``), so both pages look alike.
"""
from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

from PIL import Image

from sat_export.reports.overlays import overlay
from sat_export.results.parquet import load_alphas
from sat_export.text import printable
from training.config import PreprocessConfig
from training.errors import ImageDecodeError
from training.images import load_rgb

THUMB = 160  # longer side of gallery images, pixels
LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "cider_d": "CIDEr-D",
          "identical": "identical captions", "mean_mass": "attention inside the box",
          "mean_share": "box share of the crop", "mean_ratio": "inside / share (1 = uniform)",
          "n_words": "grounded words", "n_cropped_away": "words whose box the crop removed"}
LISTS = {"errors": "Error rows", "no_reference": "Predictions without a reference",
         "no_prediction": "References without a prediction", "grounding_skipped": "Images without grounding",
         "only_in_a": "Only in A", "only_in_b": "Only in B"}
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table.metrics td, table.metrics th { padding: 3px 14px 3px 0; text-align: left; }
table.metrics td.num { font-variant-numeric: tabular-nums; text-align: right; }
.src { color: #666; font-size: 12px; word-break: break-all; } .nowrap { white-space: nowrap; word-break: normal; }
details { margin: 6px 0; } summary { cursor: pointer; }
.card { border-top: 1px solid #ddd; padding: 12px 0; display: flex; gap: 16px; }
.card .text { min-width: 260px; max-width: 300px; }
.caption { font-size: 16px; font-weight: 600; } .empty { color: #b00; font-style: italic; }
.refs { margin: 4px 0 0 18px; padding: 0; color: #444; }
.steps { display: flex; flex-wrap: wrap; gap: 6px; align-content: flex-start; }
figure { margin: 0; text-align: center; font-size: 13px; }
figure img { display: block; border-radius: 2px; }
.ground { color: #0a6; font-size: 11px; }
"""


def write_html(report: dict, path: str | Path, preprocess: PreprocessConfig | None, gallery: int = 24) -> Path:
    """Write the report page to ``path``; overlays need ``preprocess`` (without it: images only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, preprocess, gallery), encoding="utf-8", errors="backslashreplace")
    return path


def render_html(report: dict, preprocess: PreprocessConfig | None, gallery: int = 24) -> str:
    """The page as a string; the first ``gallery`` scored images get a card each."""
    title = (f"sat-eval --compare: A = {report['a']}, B = {report['b']}" if "a" in report else
             f"sat-eval: {report['predictions']} vs {report['references']}"
             + (f" ({report['split']} split)" if report.get("split") else ""))
    parts = [page_head(title), _metrics_table(report)]
    for key, heading in LISTS.items():
        if report.get(key):
            parts.append(named_list(heading, report[key]))
    if report.get("differ"):
        rows = "".join(f"<tr><td class='src nowrap'>{escape(d['image'])}</td><td>{escape(d['a'])}</td><td>{escape(d['b'])}</td></tr>"
                       for d in report["differ"])
        parts.append(f"<h2>Captions that differ ({len(report['differ'])})</h2><table class='metrics'>"
                     f"<tr><th>image</th><th>A</th><th>B</th></tr>{rows}</table>")
    images = report.get("images", [])
    if images and gallery > 0:
        shown = images[:gallery]
        note = "" if preprocess else " — attention maps need the model (--model)"
        parts.append(f"<h2>Gallery: {len(shown)} of {len(images)} scored images{note}</h2>")
        parts += [_card(record, preprocess) for record in shown]
    parts.append("</body></html>")
    return "\n".join(parts)


def _metrics_table(report: dict) -> str:
    heading = "Agreement of B with A (A's captions as references)" if "a" in report else "Caption quality"
    sections = [(heading, [(LABELS[k], f"{v:.4f}") for k, v in report.get("metrics", {}).items()], "")]
    if report.get("grounding"):
        rows = [(LABELS[k], "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
                for k, v in report["grounding"].items()]
        sections.append(("Attention grounding", rows,
                         "For each generated word that names a boxed object: the share of its attention that falls "
                         "inside the object's boxes, against the boxes' share of the image the model saw."))
    sections.append(("Rows", [(k.replace("_", " "), str(v)) for k, v in report.get("counts", {}).items()], ""))
    html = []
    for heading, rows, note in sections:
        body = "".join(f"<tr><th>{escape(k)}</th><td class='num'>{escape(v)}</td></tr>" for k, v in rows)
        html.append(f"<h2>{heading}</h2>" + (f"<p class='src'>{escape(note)}</p>" if note else "")
                    + f"<table class='metrics'>{body}</table>")
    return "".join(html)


def named_list(heading: str, items: list, expanded: bool | None = None) -> str:
    """A collapsible list of image names (plain, or ``{"image", "reason" or "error"}`` rows), each shown
    ``printable``; open when ``expanded`` (None: when it has 20 items or fewer)."""
    lines = []
    for item in items:
        if isinstance(item, dict):
            name, why = item["image"], item.get("reason") or item.get("error", "")
            lines.append(f"<li>{escape(printable(name))} <span class='src'>— {escape(printable(why))}</span></li>")
        else:
            lines.append(f"<li>{escape(printable(item))}</li>")
    state = " open" if (len(items) <= 20 if expanded is None else expanded) else ""
    return f"<details{state}><summary><b>{escape(heading)} ({len(items)})</b></summary><ul>{''.join(lines)}</ul></details>"


def page_head(title: str) -> str:
    """The start of a page: head with the shared style, and the title as its heading."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>")


def card_html(caption: str, source_html: str, body_html: str, extra_text_html: str = "") -> str:
    """One image's card: its caption (an empty one flagged), a source line, more text, and a body."""
    caption_html = escape(caption) if caption.strip() else "<span class='empty'>(empty caption)</span>"
    return (f"<div class='card'><div class='text'><div class='caption'>{caption_html}</div>"
            f"<div class='src'>{source_html}</div>{extra_text_html}</div>{body_html}</div>")


def steps_html(figures: list[str]) -> str:
    return f"<div class='steps'>{''.join(figures)}</div>"


def figure_html(src: str, label_html: str, img_attrs: str = "") -> str:
    return f"<figure><img src='{src}'{img_attrs} alt=''><figcaption>{label_html}</figcaption></figure>"


def _card(record: dict, preprocess: PreprocessConfig | None) -> str:
    source = f"{escape(record['image'])} · CIDEr-D {record['cider_d']:.3f}"
    refs = "<ol class='refs'>" + "".join(f"<li>{escape(r)}</li>" for r in record["references"]) + "</ol>"
    try:
        image = load_rgb(record["path"])
    except ImageDecodeError as err:
        problem = f"<div class='src'>image {escape(record['path'])}: {escape(str(err))}</div>"
        return card_html(record["caption"], source, problem, refs)
    figures = [_figure(image.copy(), "(image)")]
    figures += _steps(image, record, preprocess)
    return card_html(record["caption"], source, steps_html(figures), refs)


def _steps(image: Image.Image, record: dict, preprocess: PreprocessConfig | None) -> list[str]:
    """One overlay per caption word, labelled (with its grounding when it has boxes)."""
    if preprocess is None or not record.get("alphas"):
        return []
    try:
        alphas = load_alphas(record["alphas"])
    except (OSError, KeyError, ValueError) as err:
        return [f"<div class='src'>attention: {escape(str(err))}</div>"]
    words = record["caption"].split()
    if len(alphas) != len(words):
        return [f"<div class='src'>attention: {len(alphas)} steps for {len(words)} words</div>"]
    grounded = {g["step"]: g for g in record.get("grounding", [])}
    figures = []
    for step, (word, alpha) in enumerate(zip(words, alphas)):
        g = grounded.get(step)
        note = f"<br><span class='ground'>{g['mass']:.0%} in box</span>" if g else ""
        figures.append(_figure(overlay(image, alpha, preprocess, max_side=THUMB), escape(word) + note))
    return figures


def _figure(image: Image.Image, label_html: str) -> str:
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return figure_html(uri, label_html, f" width='{image.width}' height='{image.height}'")
