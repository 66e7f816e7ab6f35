import pytest
import torch

from engines.contract import DECODER_STEP, ENCODER
from engines.errors import ShapeError
from tests.conftest import tiny_config, tiny_model
from training.model import caption_loss, make_model


@pytest.mark.parametrize("n_img,beams", [(1, 1), (3, 1), (32, 1), (1, 3), (5, 4)])
def test_encode_and_step_shapes_follow_contract(n_img, beams):
    model = tiny_model()
    dims = model.config.dims()
    images = torch.randn(n_img, 3, 64, 64)
    with torch.no_grad():
        enc = dict(zip(ENCODER.output_names, model.encode(images)))
        ENCODER.check_outputs(enc, dims)
        tokens = torch.randint(0, dims["vocab"], (n_img, beams))
        inputs = {"tokens": tokens, "h": enc["h0"].unsqueeze(1).repeat(1, beams, 1),
                  "c": enc["c0"].unsqueeze(1).repeat(1, beams, 1), "features": enc["features"],
                  "features_proj": enc["features_proj"]}
        DECODER_STEP.check_inputs(inputs, dims)
        out = dict(zip(DECODER_STEP.output_names, model.step(**inputs)))
    DECODER_STEP.check_outputs(out, dims)
    assert out["logprobs"].shape == (n_img, beams, dims["vocab"])
    assert out["alpha"].shape == (n_img, beams, 16)
    with pytest.raises(ShapeError, match="'h' has shape"):  # the rows of h must be the tokens' (batch, beams)
        DECODER_STEP.check_inputs({**inputs, "h": enc["h0"].unsqueeze(1).repeat(1, beams + 1, 1)}, dims)


@pytest.mark.parametrize("gate", [True, False])
def test_k_beams_of_an_image_in_one_step_equal_each_beam_stepped_alone(gate):
    """The step reads an image's features once for its k rows: the same outputs as each row with its own copy."""
    model = tiny_model(gate=gate)
    torch.manual_seed(3)
    with torch.no_grad():
        f, fp, h, c = model.encode(torch.randn(3, 3, 64, 64))
        tokens = torch.randint(0, model.config.vocab_size, (3, 4))
        h, c = (x.unsqueeze(1) + 0.3 * torch.randn(3, 4, x.size(1)) for x in (h, c))
        grouped = model.step(tokens, h, c, f, fp)
        for i in range(3):
            for b in range(4):
                alone = model.step(tokens[i:i + 1, b:b + 1], h[i:i + 1, b:b + 1], c[i:i + 1, b:b + 1], f[i:i + 1],
                                   fp[i:i + 1])
                for x, y in zip(grouped, alone):
                    torch.testing.assert_close(x[i, b], y[0, 0], rtol=1e-5, atol=1e-6)


def test_default_grid_is_14x14_with_resnet_and_mobilenet():
    for backbone in ("resnet18", "mobilenet_v3_small_s16"):
        model = make_model(10, backbone=backbone).eval()
        with torch.no_grad():
            features, proj, h0, c0 = model.encode(torch.randn(2, 3, 224, 224))
        assert features.shape == (2, 196, model.config.enc_dim)
        assert proj.shape == (2, 196, 128) and h0.shape == c0.shape == (2, 256)


@pytest.mark.parametrize("attention,gate", [("tanh", True), ("relu", False)])
def test_alphas_sum_to_one_and_logprobs_normalised(attention, gate):
    model = tiny_model(attention=attention, gate=gate)
    with torch.no_grad():
        f, fp, h, c = model.encode(torch.randn(5, 3, 64, 64))
        lp, alpha, _, _ = model.step(torch.arange(10).view(5, 2), *(x.unsqueeze(1).repeat(1, 2, 1) for x in (h, c)),
                                     f, fp)
    torch.testing.assert_close(alpha.sum(2), torch.ones(5, 2))
    torch.testing.assert_close(lp.exp().sum(2), torch.ones(5, 2))
    assert (alpha >= 0).all()


def test_teacher_forced_loss_equals_hand_written_loop_over_step():
    model = tiny_model(dropout=0.0)
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    captions = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 4, 5, 6, 7, 2], [1, 9, 10, 2, 0, 0]])
    logprobs, alphas = model(images, captions)
    total, nll = caption_loss(logprobs, alphas, captions, pad_id=0, alpha_c=1.0)

    features, proj, h, c = model.encode(images)
    nll_sum, n_words, att_sum = 0.0, 0, torch.zeros(4, 16)
    for i in range(4):
        hi, ci = h[i : i + 1, None], c[i : i + 1, None]
        for t in range(captions.size(1) - 1):
            target = captions[i, t + 1].item()
            if target == 0:
                break
            lp, alpha, hi, ci = model.step(captions[i : i + 1, t : t + 1], hi, ci, features[i : i + 1], proj[i : i + 1])
            nll_sum -= lp[0, 0, target]
            n_words += 1
            att_sum[i] += alpha[0, 0]
    expected_nll = nll_sum / n_words
    expected_total = expected_nll + ((1 - att_sum) ** 2).mean()
    torch.testing.assert_close(nll, expected_nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-6)


def test_loss_gradients_reach_decoder_and_frozen_flag_is_respected():
    model = tiny_model().train()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    total, _ = caption_loss(*model(torch.randn(2, 3, 64, 64), captions), captions, pad_id=0)
    total.backward()
    assert model.fc.weight.grad.abs().sum() > 0
    assert model.attention.enc_att.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_config_rejects_bad_values_and_mismatched_backbone():
    with pytest.raises(ValueError, match="attention"):
        tiny_config(attention="softmax")
    with pytest.raises(ValueError, match="enc_dim"):
        from training.model import ShowAttendTell
        ShowAttendTell(tiny_config(enc_dim=2048))
    with pytest.raises(ValueError, match="preset"):
        make_model(10, preset="huge")


def test_the_cell_is_lstmcell_and_keeps_its_state_in_float32_in_a_half_model():
    x, h, c = torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        half = tiny_model().half()
        x16, h16 = x.half(), h.half()
        by_hand = half.cell(x16, h16, c)
        ref = tiny_model().half().float().lstm(x16.float(), (h16.float(), c))  # the same weights, all in float32
        assert [t.dtype for t in by_hand] == [torch.float32] * 2
        assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(by_hand, ref))
        enc = half.encode(torch.randn(2, 3, 64, 64).half())
        logprobs, alpha, h_next, c_next = half.step(torch.zeros(2, 1, dtype=torch.long), enc[2][:, None],
                                                    enc[3].float()[:, None], *enc[:2])
    assert [t.dtype for t in (logprobs, alpha, h_next, c_next)] == [torch.float32] * 4
    double = tiny_model().double()  # the parity gate's float64 oracle stays float64 throughout
    with torch.no_grad():
        enc = double.encode(torch.randn(2, 3, 64, 64).double())
        assert {t.dtype for t in double.step(torch.zeros(2, 1, dtype=torch.long), enc[2][:, None], enc[3][:, None],
                                             *enc[:2])} == {
            torch.float64}
