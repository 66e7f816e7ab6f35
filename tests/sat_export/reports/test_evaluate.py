"""sat-eval end to end on a tiny synthetic shapes set: matching, the named lists, metrics, grounding, HTML, CLI."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from sat_export.cli.eval import app
from sat_export.errors import EvalError
from sat_export.reports.evaluate import compare, evaluate, match_names, read_predictions
from sat_export.reports.html import render_html
from training.config import PreprocessConfig
from training.data import load_captions
from training.metrics import box_coverage, cider_d, corpus_bleu, crop_window
from training.shapes import make_shapes
from training.vocab import tokenize

CFG = PreprocessConfig(resize=96, crop=80)
GRID = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 8, seed=3, size=96)


def oracle_alphas(caption: str, boxes: dict) -> np.ndarray:
    """Attention spread over each noun's box cells (uniform for other words): ``(T, GRID, GRID)``."""
    steps = []
    for word in caption.split():
        cov = box_coverage(boxes[word], crop_window((96, 96), CFG), GRID) if word in boxes else np.ones((GRID, GRID))
        steps.append(cov / cov.sum())
    return np.asarray(steps, dtype=np.float16).reshape(-1, GRID, GRID)


def write_run(tmp_path, shapes, rows_for) -> tuple:
    """Rows for images 0-4 (sat-infer layout: keys relative to the images folder, alphas beside)."""
    refs = {item.name: item for item in load_captions(shapes / "captions.txt")}
    boxes = json.loads((shapes / "boxes.json").read_text())
    rows = []
    for i in range(5):
        name = f"{i:05d}.jpg"
        row = rows_for(i, name, " ".join(refs[name].captions[0]))
        if "caption" in row:
            alphas = oracle_alphas(row["caption"], boxes[name])
            (tmp_path / "alphas").mkdir(exist_ok=True)
            np.savez(tmp_path / "alphas" / f"{name}.npz", alphas=alphas, tokens=np.arange(len(alphas), dtype=np.int32))
            row.update(tokens=list(range(len(alphas))), alphas=f"alphas/{name}.npz")
        rows.append(row)
    rows.append({"image": "elsewhere/zebra.jpg", "caption": "a zebra"})
    pred = tmp_path / "captions.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pred, refs


def typical(i, name, first_ref):
    if i == 1:
        return {"image": name, "caption": ""}
    if i == 2:
        return {"image": name, "error": "cannot identify image file"}
    return {"image": f"images/{name}" if i == 3 else name, "caption": first_ref, "score": -1.0}


def test_evaluate_names_every_row_and_scores_like_the_reference_metrics(tmp_path, shapes):
    pred, refs = write_run(tmp_path, shapes, typical)
    report = evaluate(pred, shapes / "captions.txt", boxes_path=shapes / "boxes.json", preprocess=CFG)
    assert report["counts"] == {"rows": 6, "scored": 4, "errors": 1, "empty_captions": 1, "no_reference": 1,
                                "no_prediction": 3, "grounding_skipped": 0}
    assert report["errors"] == [{"image": "00002.jpg", "error": "cannot identify image file"}]
    assert report["no_reference"] == [{"image": "elsewhere/zebra.jpg", "reason": "no reference"}]
    assert report["no_prediction"] == ["00005.jpg", "00006.jpg", "00007.jpg"]
    names = ["00000.jpg", "00001.jpg", "00003.jpg", "00004.jpg"]
    assert [r["reference"] for r in report["images"]] == names
    hyps = [tokenize(" ".join(refs[n].captions[0])) if n != "00001.jpg" else [] for n in names]
    expected = corpus_bleu([refs[n].captions for n in names], hyps)
    assert {k: report["metrics"][k] for k in expected} == expected
    assert report["metrics"]["cider_d"] == cider_d([refs[n].captions for n in names], hyps)[0]
    assert report["images"][1]["cider_d"] == 0.0  # the empty caption
    boxes = json.loads((shapes / "boxes.json").read_text())
    for record in report["images"]:  # oracle attention ~ coverage: mass = sum(cov^2) / sum(cov)
        for g in record["grounding"]:
            cov = box_coverage(boxes[record["reference"]][g["word"]], crop_window((96, 96), CFG), GRID)
            assert g["mass"] == pytest.approx((cov ** 2).sum() / cov.sum(), abs=2e-3)
            assert g["share"] == pytest.approx(cov.mean()) and g["ratio"] == pytest.approx(g["mass"] / g["share"])
    assert report["grounding"]["n_words"] == 5 and report["grounding"]["mean_ratio"] > 3


def test_evaluate_split_and_problem_alphas_are_reported(tmp_path, shapes):
    def rows(i, name, first_ref):
        return {"image": name, "caption": first_ref}
    pred, refs = write_run(tmp_path, shapes, rows)
    (tmp_path / "alphas" / "00000.jpg.npz").unlink()
    np.savez(tmp_path / "alphas" / "00003.jpg.npz", alphas=np.ones((1, GRID, GRID)), tokens=np.zeros(1))
    report = evaluate(pred, shapes / "captions.txt", split="train", boxes_path=shapes / "boxes.json", preprocess=CFG)
    train = {item.name for item in load_captions(shapes / "captions.txt") if item.split == "train"}
    assert {r["reference"] for r in report["images"]} == train & {f"{i:05d}.jpg" for i in range(5)}
    outside = [r for r in report["no_reference"] if "split" in r["reason"]]
    assert len(outside) == 5 - len(report["images"])
    skipped = {s["image"]: s["reason"] for s in report["grounding_skipped"]}
    assert set(skipped) == {"00000.jpg", "00003.jpg"} & train
    assert all("cannot read alphas" in why or "differ from the row" in why for why in skipped.values())


def test_match_names_by_trailing_path_components():
    names = ["val2014/a.jpg", "x/b.jpg", "y/b.jpg", "c.jpg"]
    got = match_names(["a.jpg", "data/val2014/a.jpg", "b.jpg", "x/b.jpg", "sub/c.jpg", "d.jpg", "other/a.jpg"], names)
    assert got == [("val2014/a.jpg", None),
                   (None, "reference val2014/a.jpg already matched by the row of a.jpg"),
                   (None, "ambiguous: matches x/b.jpg, y/b.jpg"), ("x/b.jpg", None), ("c.jpg", None),
                   (None, "no reference"), (None, "no reference")]


def test_karpathy_and_token_references_are_read_by_the_training_readers(tmp_path):
    (tmp_path / "dataset_toy.json").write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A red circle."}, {"raw": "a red disc"}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "a blue square"}]}]}))
    (tmp_path / "token.txt").write_text("a.jpg#0\tA red circle.\na.jpg#1\ta red disc\nb.jpg#0\ta blue square\n")
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"image": "a.jpg", "caption": "a red circle"}\n{"image": "b.jpg", "caption": "a red circle"}\n')
    karpathy = evaluate(pred, tmp_path / "dataset_toy.json", split="test")
    assert karpathy["metrics"]["bleu1"] == 1.0 and karpathy["counts"]["scored"] == 1
    assert karpathy["no_reference"] == [{"image": "b.jpg", "reason": "its reference is in the train split"}]
    token = evaluate(pred, tmp_path / "token.txt")
    assert token["counts"]["scored"] == 2 and token["metrics"]["bleu1"] < 1.0


def test_malformed_predictions_name_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg"}\n')
    with pytest.raises(EvalError, match=r"p.jsonl:2: expected an object with 'image'"):
        read_predictions(bad)
    bad.write_text('{"image": "a.jpg", "capt')
    with pytest.raises(EvalError, match=r"p.jsonl:1: not a JSON row"):
        read_predictions(bad)


def test_compare_scores_b_against_a(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"image": "1.jpg", "caption": "a red circle"}\n{"image": "2.jpg", "caption": "a blue square"}\n'
                 '{"image": "3.jpg", "error": "truncated"}\n{"image": "4.jpg", "caption": "x"}\n')
    b.write_text('{"image": "1.jpg", "caption": "a red circle"}\n{"image": "2.jpg", "caption": "a blue circle"}\n'
                 '{"image": "3.jpg", "caption": "a star"}\n{"image": "5.jpg", "caption": "y"}\n')
    report = compare(a, b)
    assert report["counts"] == {"compared": 2, "differ": 1, "errors": 1, "only_in_a": 1, "only_in_b": 1}
    assert report["metrics"]["identical"] == 0.5
    assert report["metrics"]["bleu1"] == corpus_bleu([[["a", "red", "circle"]], [["a", "blue", "square"]]],
                                                     [["a", "red", "circle"], ["a", "blue", "circle"]])["bleu1"]
    assert report["errors"] == [{"image": "3.jpg", "error": "a: truncated"}]
    assert report["only_in_a"] == ["4.jpg"] and report["only_in_b"] == [{"image": "5.jpg", "reason": "not in A"}]
    page = render_html(report, None)
    assert "A = " in page and "Agreement of B with A" in page and "a blue circle" in page


def test_html_report_embeds_overlays_and_escapes_text(tmp_path, shapes):
    def rows(i, name, first_ref):
        return {"image": name, "caption": first_ref} if i else {"image": "<b>.jpg", "caption": "x"}
    pred, _ = write_run(tmp_path, shapes, rows)
    report = evaluate(pred, shapes / "captions.txt", boxes_path=shapes / "boxes.json", preprocess=CFG)
    page = render_html(report, CFG, gallery=2)
    assert "&lt;b&gt;.jpg" in page and "<b>.jpg" not in page
    assert "Gallery: 2 of 4 scored images" in page
    words = sum(len(r["caption"].split()) for r in report["images"][:2])
    assert page.count("data:image/jpeg;base64,") == 2 + words  # each image, then one overlay per word
    assert "% in box" in page and "http" not in page  # offline: nothing fetched


def test_cli_prints_names_and_writes_json(tmp_path, shapes, tiny_ckpt):
    pred, _ = write_run(tmp_path, shapes, typical)
    out = CliRunner().invoke(app, ["--pred", str(pred), "--refs", str(shapes), "--boxes", str(shapes / "boxes.json"),
                                   "--model", str(tiny_ckpt), "--json", str(tmp_path / "r.json"),
                                   "--html", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    assert "BLEU-4" in out.output and "elsewhere/zebra.jpg: no reference" in out.output and "00007.jpg" in out.output
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["scored"] == 4
    assert (tmp_path / "r.html").stat().st_size > 1000


def test_cli_user_errors_are_one_line(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["--pred", str(tmp_path / "missing.jsonl"), "--refs", str(tmp_path)])
    assert out.exit_code == 1 and "error:" in out.output and "Traceback" not in out.output
    out = runner.invoke(app, ["--pred", str(tmp_path / "p.jsonl"), "--refs", str(tmp_path), "--split", "dev"])
    assert out.exit_code == 1 and "unknown split 'dev'" in out.output
    out = runner.invoke(app, ["--pred", "p.jsonl"])
    assert out.exit_code == 1 and "pass --pred and --refs" in out.output


def test_compare_evaluate_on_per_shard_parquet_results_vs_jsonl_with_alphas_files(tmp_path, shapes):
    """The shapes photos captioned by the demo model as files (alphas .npz) and as a WebDataset shard
    (``<stem>.jpg`` members; Parquet results, alphas inside): the same scores, grounding and gallery."""
    from sat_export.cli.infer import app as infer_app
    from sat_export.registry import model_config

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for path in sorted((shapes / "images").iterdir()):
            tar.add(path, arcname=path.name)
    common = ["--backend", "torch"]
    results = f"{tmp_path}/results/"
    for args in ([str(shapes / "images"), "--out", str(tmp_path / "c.jsonl"), "--alphas", str(tmp_path / "alphas")],
                 [str(tmp_path / "00000.tar"), "--out", results, "--alphas", results]):
        done = CliRunner().invoke(infer_app, [*args, *common])
        assert done.exit_code == 0, done.output
    cfg = model_config(None).preprocess
    kwargs = dict(boxes_path=shapes / "boxes.json", preprocess=cfg)
    files = evaluate(tmp_path / "c.jsonl", shapes / "captions.txt", **kwargs)
    shards = evaluate(results, shapes / "captions.txt", **kwargs)
    assert shards["counts"] == files["counts"] and shards["counts"]["scored"] == 8
    assert shards["metrics"] == files["metrics"] and shards["grounding"] == files["grounding"]
    assert shards["grounding"]["n_words"] > 0 and not shards["grounding_skipped"]
    assert [r["image"] for r in shards["images"]] == [f"00000.tar/{r['reference'][:-4]}" for r in files["images"]]
    assert shards["images"][0]["alphas"] == f"file://{tmp_path}/results/00000.parquet#0"  # its row
    page = render_html(shards, cfg, gallery=2)
    words = sum(len(r["caption"].split()) for r in shards["images"][:2])
    assert page.count("data:image/jpeg;base64,") == 2 + words  # each image, then one overlay per word
    cli = CliRunner().invoke(app, ["--pred", results, "--refs", str(shapes / "captions.txt"), "--boxes",
                                   str(shapes / "boxes.json")])
    assert cli.exit_code == 0 and "BLEU-4" in cli.output and "grounded words" in cli.output, cli.output
