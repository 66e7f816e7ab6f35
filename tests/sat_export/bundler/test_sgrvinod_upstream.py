"""An sgrvinod checkpoint written by upstream's own classes and ``save_checkpoint`` (the verified copy in
tests/fixtures/sgrvinod_upstream.py), imported, against upstream's ``caption.py`` on photos of every shape:
the same encoder input bit for bit, the same greedy captions and alphas (eager and through the built
bundle), and beam-3 captions scoring at least upstream's."""
import json
from types import SimpleNamespace

import matplotlib.cbook
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from sat_export.bundler.builder import build_bundle
from sat_export.bundler.importers import SGRVINOD_PREPROCESS, import_sgrvinod
from sat_export.registry import open_backend
from tests.fixtures import sgrvinod_upstream as upstream_code
from training.checkpoint import load_checkpoint
from training.decode import decode
from training.images import load_image
from training.options import DecodeOptions

UPSTREAM_MAX_LEN = 51  # caption.py stops after step 51


def _photos(folder):
    """Non-square crops and scalings of a real photo (512x600), both orientations, on either side of the
    1536 px where Pillow's ``reducing_gap=3.0`` would start to differ from upstream's plain resize."""
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    shapes = {"portrait.jpg": photo, "landscape.jpg": photo.crop((0, 150, 512, 450)),
              "wide_1800x1000.jpg": photo.resize((1800, 1000), Image.Resampling.BICUBIC),
              "tall_700x1700.png": photo.resize((700, 1700), Image.Resampling.BICUBIC),
              "small_200x120.png": photo.crop((100, 100, 300, 220))}
    for name, img in shapes.items():
        img.save(folder / name, quality=95)
    return [folder / name for name in shapes]


def _length_clock(decoder, end: int, rate=0.07, weight=12.0, bias=-4.0):
    """LSTM unit 0 counts steps (gates open, constant input), and <end> grows likelier with it: random
    weights then give captions of about 10 words, where they would otherwise end at once or never."""
    n, lstm = decoder.decoder_dim, decoder.decode_step
    lstm.weight_ih[0::n].zero_()
    lstm.weight_hh[0::n].zero_()
    lstm.bias_ih[0::n] = torch.tensor([20.0, 20.0, rate, 20.0])  # input, forget, cell, output gates
    lstm.bias_hh[0::n] = 0.0
    decoder.init_c.weight[0].zero_()
    decoder.init_c.bias[0] = 0.0
    decoder.fc.weight[end].zero_()
    decoder.fc.weight[end, 0], decoder.fc.bias[end] = weight, bias


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upstream")
    photos = _photos(tmp)
    word_map = upstream_code.upstream_word_map([f"w{i}" for i in range(40)])
    torch.manual_seed(0)
    encoder = upstream_code.Encoder(resnet=torchvision.models.resnet18)
    decoder = upstream_code.DecoderWithAttention(32, 32, 48, len(word_map), encoder_dim=512)
    with torch.no_grad():
        for m in encoder.modules():  # batch-norm statistics of the photos: realistic activations
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        encoder.train()(torch.stack([upstream_code.upstream_preprocess(p) for p in photos]))
        gen = torch.Generator().manual_seed(1)
        for p in decoder.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        decoder.fc.weight.mul_(5.0)  # peaky word distributions: captions depend on the image
        _length_clock(decoder, word_map["<end>"])
    encoder.eval()
    decoder.eval()
    pth = upstream_code.save_upstream_checkpoint(tmp / "BEST_checkpoint_tiny.pth.tar", encoder, decoder)
    (tmp / "WORDMAP_tiny.json").write_text(json.dumps(word_map))
    ckpt = import_sgrvinod(pth, tmp / "WORDMAP_tiny.json", tmp / "imported.pth", trust_pickle=True)
    return SimpleNamespace(encoder=encoder, decoder=decoder, word_map=word_map, photos=photos, ckpt=ckpt, tmp=tmp,
                           upstream={})


def _upstream_caption(imported, photo, beam):
    """caption.py's words (without <start>/<end>), alphas of those words ``(n, n_pix)``, and score."""
    if (photo, beam) not in imported.upstream:
        with torch.no_grad():
            seq, alphas, score = upstream_code.caption_image_beam_search_with_score(
                imported.encoder, imported.decoder, photo, imported.word_map, beam)
        words = {i: w for w, i in imported.word_map.items()}
        imported.upstream[photo, beam] = ([words[i] for i in seq[1:-1]],
                                          np.asarray(alphas)[1:-1].reshape(len(seq) - 2, -1), score)
    return imported.upstream[photo, beam]


def _our_caption(model, vocab, preprocess, photo, beam):
    images = torch.from_numpy(load_image(photo, preprocess))[None]  # (1, 3, 256, 256)
    options = DecodeOptions(beam=beam, max_len=UPSTREAM_MAX_LEN)
    caption = decode(model.step, model.encode(images), vocab.special_ids(), options)[0]
    assert caption.finished
    return vocab.decode(caption.tokens), caption.alphas, caption.score


def test_compare_encoder_input_vs_upstream_caption_py(imported):
    ck = load_checkpoint(imported.ckpt)
    assert ck.config.preprocess == SGRVINOD_PREPROCESS
    for photo in imported.photos:
        np.testing.assert_array_equal(load_image(photo, ck.config.preprocess),
                                      upstream_code.upstream_preprocess(photo).numpy(), err_msg=photo.name)


def _eager_vs_upstream(imported, beam):
    """Per photo: its name, upstream's (words, alphas, score) and ours, from the imported checkpoint."""
    ck = load_checkpoint(imported.ckpt)
    model = ck.build_model()
    for photo in imported.photos:
        yield photo.name, _upstream_caption(imported, photo, beam), _our_caption(
            model, ck.vocab, ck.config.preprocess, photo, beam)


def test_compare_greedy_captions_vs_upstream_beam_1(imported):
    for name, (words, alphas, score), (ours, our_alphas, our_score) in _eager_vs_upstream(imported, beam=1):
        assert ours == words, name
        assert len(words) >= 5, "captions long enough to tell images apart"
        np.testing.assert_allclose(our_alphas, alphas, atol=1e-5, err_msg=name)
        assert our_score == pytest.approx(score, abs=1e-4)


@pytest.mark.slow
def test_compare_bundle_greedy_captions_vs_upstream_beam_1(imported):
    bundle = build_bundle(imported.ckpt, imported.tmp / "bundle")  # raises ParityError unless the gate passes
    with open_backend(bundle, "onnxruntime", device="cpu") as backend:
        assert backend.config.preprocess == SGRVINOD_PREPROCESS  # through the manifest
        for photo in imported.photos:
            ours, _, _ = _our_caption(backend, backend.vocab, backend.config.preprocess, photo, beam=1)
            assert ours == _upstream_caption(imported, photo, beam=1)[0], photo.name


def test_compare_beam_3_captions_vs_upstream(imported):
    # Upstream's beam shrinks as hypotheses finish; ours keeps k live beams until k have finished.
    # Where the two searches pick different captions, ours must score at least as well.
    for name, (words, _, score), (ours, _, our_score) in _eager_vs_upstream(imported, beam=3):
        if ours == words:
            assert our_score == pytest.approx(score, abs=1e-4), name
        else:
            assert our_score >= score - 1e-4, (name, ours, words, our_score, score)
