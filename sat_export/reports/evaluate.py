"""``sat-eval``'s library: read predictions and references, match images, score, report as a dict.

Predictions are ``sat-infer``'s JSONL rows; references are any captions file ``training.data``
reads. A prediction's ``image`` key matches the reference whose name is the same path, or the one
reference whose name shares its trailing path components (``images/00001.jpg`` ~ ``00001.jpg``).
Nothing is dropped silently: error rows, predictions without a reference, references without a
prediction, and images whose grounding could not be scored are listed by name in the report.
Captions are tokenised with ``training.vocab.tokenize``, as references are; an empty caption is
scored as an empty hypothesis (wrong), not skipped.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from sat_export.errors import EvalError
from sat_export.results.parquet import is_results, load_alphas, read_results
from sat_export.results.paths import sidecar_path
from training.config import PreprocessConfig
from training.data import SPLITS, ImageCaptions, load_boxes, load_captions, upright_size
from training.errors import first_line
from training.metrics import (WordGrounding, attention_grounding, caption_agreement, cider_d, corpus_bleu,
                              summarize_grounding)
from training.vocab import tokenize


@dataclass(frozen=True)
class Prediction:
    """One JSONL row: a caption, or the error that replaced it."""

    image: str
    caption: str | None
    error: str | None
    alphas: Path | str | None  # resolved .npz path, when the row or --alphas names one; in a result: its ref
    tokens: list[int] | None  # JSONL rows' (to check their .npz file); a result's alphas are in its own row


def read_predictions(path: str | Path, alphas_dir: str | Path | None = None) -> list[Prediction]:
    """``sat-infer`` rows from ``path``: a JSONL file, or per-shard Parquet results (a file, folder or URL:
    ``results.parquet.read_results``, read a batch at a time; their alphas are read when needed); JSONL
    ``alphas`` paths are resolved against its folder or ``alphas_dir``."""
    if is_results(path):
        try:
            return [Prediction(row["image"], row.get("caption"), row.get("error"), row.get("alphas"), None)
                    for row in read_results(str(path))]
        except (OSError, ValueError) as err:
            raise EvalError(f"{path}: cannot read predictions ({first_line(err)})") from None
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: cannot read predictions ({getattr(err, 'strerror', None) or err})") from None
    preds = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{lineno}: not a JSON row ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not (
                isinstance(row.get("caption"), str) or "error" in row):
            raise EvalError(f"{path}:{lineno}: expected an object with 'image' and 'caption' or 'error', got {line[:80]!r}")
        if alphas_dir is not None:
            alphas = sidecar_path(row["image"], Path(alphas_dir), ".npz")
        else:
            alphas = path.parent / row["alphas"] if isinstance(row.get("alphas"), str) else None
        caption = row.get("caption") if "error" not in row else None
        preds.append(Prediction(row["image"], caption, str(row["error"]) if "error" in row else None,
                                alphas, row.get("tokens")))
    return preds


def match_names(keys: list[str], names: list[str], missing: str = "no reference") -> list[tuple[str | None, str | None]]:
    """Match prediction keys to reference names: per key, ``(name, None)`` or ``(None, why not)``.

    A key matches the name equal to it, else the one name with which it shares all the trailing path
    components of the shorter (``a/b/c.jpg`` ~ ``b/c.jpg``), else, for a key without a suffix (a shard's
    ``00000.tar/c``), the one name whose file name is ``c`` plus a suffix. Each name is matched at most once;
    ``missing`` is the reason given when nothing matches.
    """
    exact, by_base, by_stem = set(names), defaultdict(list), defaultdict(list)
    for name in names:
        by_base[PurePosixPath(name).name].append(name)
        by_stem[PurePosixPath(name).stem].append(name)
    out, taken = [], {}
    for key in keys:
        if key in exact:
            found = [key]
        else:
            kp = PurePosixPath(key).parts
            found = [n for n in by_base.get(PurePosixPath(key).name, []) if _suffix_match(kp, PurePosixPath(n).parts)]
            if not found and not PurePosixPath(key).suffix:  # a shard's sample key: the name without its suffix
                found = by_stem.get(PurePosixPath(key).name, [])
        if not found:
            out.append((None, missing))
        elif len(found) > 1:
            out.append((None, f"ambiguous: matches {', '.join(found[:3])}"))
        elif found[0] in taken:
            out.append((None, f"reference {found[0]} already matched by the row of {taken[found[0]]}"))
        else:
            taken[found[0]] = key
            out.append((found[0], None))
    return out


def _suffix_match(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    n = min(len(a), len(b))
    return a[-n:] == b[-n:]


def grounding_of(pred: Prediction, words: list[str], boxes: dict, image: Path,
                 preprocess: PreprocessConfig) -> list[WordGrounding]:
    """Per-word grounding of one prediction (see ``attention_grounding``), or ``EvalError`` saying why not."""
    if pred.alphas is None:
        raise EvalError("row has no alphas file (run sat-infer with --alphas, or pass --alphas DIR)")
    if isinstance(pred.alphas, str):
        try:
            alphas = load_alphas(pred.alphas)  # inside the row's result: its own tokens'
        except (OSError, KeyError, ValueError) as err:
            raise EvalError(f"{pred.alphas}: cannot read alphas ({first_line(err)})") from None
    else:
        try:
            with np.load(pred.alphas) as npz:
                alphas, tokens = npz["alphas"], npz["tokens"]
        except (OSError, KeyError, ValueError) as err:
            raise EvalError(f"{pred.alphas}: cannot read alphas ({first_line(err)})") from None
        if pred.tokens is not None and [int(t) for t in tokens] != list(pred.tokens):
            raise EvalError(f"{pred.alphas}: its tokens differ from the row's (stale alphas file?)")
    if len(alphas) != len(words):
        raise EvalError(f"{pred.alphas}: {len(alphas)} attention steps for {len(words)} caption words")
    try:
        size = upright_size(image)
    except OSError as err:
        raise EvalError(f"{image}: cannot read image size ({first_line(err)})") from None
    return attention_grounding(alphas, words, boxes, size, preprocess)


def evaluate(pred_path: str | Path, refs_path: str | Path, split: str | None = None, images: str | Path | None = None,
             boxes_path: str | Path | None = None, alphas_dir: str | Path | None = None,
             preprocess: PreprocessConfig | None = None) -> dict:
    """Score predictions against references: BLEU-1..4, CIDEr-D and, with boxes, attention grounding.

    Parameters
    ----------
    pred_path : ``sat-infer`` JSONL, or per-shard Parquet results (a file, folder or URL).
    refs_path, images : references file (or folder) and image folder, as ``training.data.load_captions`` takes.
    split : keep only the references of this split (``train``/``val``/``test``); None keeps all. Files
        without splits get ``training.data``'s name-hash split (its default fractions).
    boxes_path : ``boxes.json``; grounding needs it, the alphas files and ``preprocess``.
    alphas_dir : where ``<image>.npz`` files are, instead of each row's ``alphas`` path.

    Returns
    -------
    A JSON-ready dict: ``metrics``, ``counts``, the named ``errors``/``no_reference``/``no_prediction``/
    ``grounding_skipped`` lists, and ``images`` (one record per scored image, in prediction order).
    """
    if boxes_path is not None and preprocess is None:
        raise ValueError("grounding needs the model's preprocessing")
    if split not in (None, *SPLITS):
        raise EvalError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} (or none for all images)")
    refs = load_captions(refs_path, images)
    preds = read_predictions(pred_path, alphas_dir)
    by_name = {r.name: r for r in refs}
    errors, no_reference, scored = [], [], []
    matches = match_names([p.image for p in preds], list(by_name))
    for pred, (name, why) in zip(preds, matches):
        if pred.error is not None:
            errors.append({"image": pred.image, "error": pred.error})
        elif name is None:
            no_reference.append({"image": pred.image, "reason": why})
        elif split is not None and by_name[name].split != split:
            no_reference.append({"image": pred.image, "reason": f"its reference is in the {by_name[name].split} split"})
        else:
            scored.append((pred, by_name[name]))
    predicted = {name for name, _ in matches}
    no_prediction = [r.name for r in refs if (split is None or r.split == split) and r.name not in predicted]
    hyps = [tokenize(p.caption) for p, _ in scored]
    report = {"predictions": str(pred_path), "references": str(refs_path), "split": split, "metrics": {},
              "counts": {"rows": len(preds), "scored": len(scored), "errors": len(errors),
                         "empty_captions": sum(not h for h in hyps), "no_reference": len(no_reference),
                         "no_prediction": len(no_prediction)},
              "errors": errors, "no_reference": no_reference, "no_prediction": no_prediction, "images": []}
    if scored:
        cider, each = cider_d([ref.captions for _, ref in scored], hyps)
        report["metrics"] = {**corpus_bleu([ref.captions for _, ref in scored], hyps), "cider_d": cider}
        report["images"] = [
            {"image": p.image, "reference": ref.name, "path": str(ref.path), "caption": p.caption,
             "references": [" ".join(c) for c in ref.captions], "cider_d": float(score),
             "alphas": str(p.alphas) if p.alphas else None}
            for (p, ref), score in zip(scored, each)]
    if boxes_path is not None:
        _add_grounding(report, scored, hyps, load_boxes(boxes_path), preprocess)
    return report


def _add_grounding(report: dict, scored: list[tuple[Prediction, ImageCaptions]], hyps: list[list[str]],
                   boxes: dict, preprocess: PreprocessConfig) -> None:
    """Score each image's attention against its boxes; record per-image words and the corpus summary."""
    words_all, skipped = [], []
    for record, (pred, ref), words in zip(report["images"], scored, hyps):
        if ref.name not in boxes:
            skipped.append({"image": pred.image, "reason": f"no entry {ref.name!r} in boxes.json"})
            continue
        try:
            grounding = grounding_of(pred, words, boxes[ref.name], ref.path, preprocess)
        except (EvalError, ValueError) as err:
            skipped.append({"image": pred.image, "reason": str(err)})
            continue
        record["grounding"] = [asdict(g) for g in grounding]
        words_all += grounding
    report["grounding"] = summarize_grounding(words_all)
    report["grounding_skipped"] = skipped
    report["counts"]["grounding_skipped"] = len(skipped)


def compare(a_path: str | Path, b_path: str | Path) -> dict:
    """Agreement of two prediction files on the same images (backend parity, quantisation checks).

    B's captions are scored with A's as the single reference: identical-caption rate, BLEU-1..4.
    Rows that are errors in either file, or present in only one, are listed by name.
    """
    a = {p.image: p for p in read_predictions(a_path)}
    b = read_predictions(b_path)
    matches = match_names([p.image for p in b], list(a), missing="not in A")
    pairs = [(a[name], pb) for pb, (name, _) in zip(b, matches) if name is not None]
    both = [(pa, pb) for pa, pb in pairs if pa.error is None and pb.error is None]
    differ = [{"image": pb.image, "a": pa.caption, "b": pb.caption} for pa, pb in both if pa.caption != pb.caption]
    report = {
        "a": str(a_path), "b": str(b_path),
        "errors": [{"image": p.image, "error": f"{side}: {p.error}"}
                   for pair in pairs for side, p in zip("ab", pair) if p.error is not None],
        "only_in_a": sorted(set(a) - {name for name, _ in matches}),
        "only_in_b": [{"image": pb.image, "reason": why} for pb, (name, why) in zip(b, matches) if name is None],
        "differ": differ, "metrics": {},
    }
    if both:
        report["metrics"] = {"identical": caption_agreement([pa.caption for pa, _ in both],
                                                             [pb.caption for _, pb in both]),
                             **corpus_bleu([[tokenize(pa.caption)] for pa, _ in both],
                                           [tokenize(pb.caption) for _, pb in both])}
    report["counts"] = {"compared": len(both), "differ": len(differ), "errors": len(report["errors"]),
                        "only_in_a": len(report["only_in_a"]), "only_in_b": len(report["only_in_b"])}
    return report
