"""The control rows' building blocks against independent references, and the fusion-weight
provenance check of `diffgap export`."""
import argparse
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from diffgap.baselines import RegressionBridge, mean_shift
from diffgap.core.errors import UserError
from diffgap.prior import frechet_distance, knn_precision_recall, mean_cosine_to_partner


def test_mean_shift_by_hand():
    q = np.array([[1.0, 0.0], [0.5, 0.5]])
    out = mean_shift(q, mean_query_modality=np.array([1.0, 0.0]), mean_gallery_modality=np.array([0.0, 1.0]))
    np.testing.assert_allclose(out, [[0.0, 1.0], [-0.5, 1.5]])


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    y = 0.5 + rng.standard_normal((250, 6)) @ rng.standard_normal((6, 6))
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sx @ sy).real
    ref = ((mx - my) ** 2).sum() + np.trace(sx + sy - 2 * covmean)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_knn_precision_recall_on_constructed_sets():
    # real: 10 points at 0..9 on a line (3rd-NN radius 2 inside, 3 at the ends); fake: 5 points 0.1 right of
    # real 0..4, 5 points far away. Precision: 5 of 10 fakes fall in a real ball. Recall: the near fakes'
    # balls (radius 3 at 0.1 and 4.1, 2 between) cover real 0..7, the far ones none: 8 of 10.
    real = np.stack([np.arange(10.0), np.zeros(10)], 1)
    fake = np.stack([np.r_[np.arange(5) + 0.1, 1000 + np.arange(5.0)], np.zeros(10)], 1)
    p, r = knn_precision_recall(real, fake, k=3)
    assert p == pytest.approx(0.5) and r == pytest.approx(0.8)
    assert knn_precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k"):
        knn_precision_recall(real[:3], fake, k=3)


def test_mean_cosine_to_partner():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert mean_cosine_to_partner(x, np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)


def test_regression_bridge_matches_the_denoiser_parameter_count():
    from diffgap.config import get_preset
    from diffgap.models import DiffGAP, count_parameters

    cfg = get_preset("clap-512")
    target = count_parameters(DiffGAP(cfg).denoiser(cfg.directions[0]))
    net = RegressionBridge.matching(cfg.heads.dim, cfg.denoiser.depth, cfg.denoiser.mlp_ratio, target)
    assert abs(count_parameters(net) - target) / target < 0.02


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from diffgap.checkpoint import save_checkpoint
    from diffgap.config import get_preset
    from diffgap.models import DiffGAP

    d = tmp_path_factory.mktemp("prov")
    torch.manual_seed(0)
    save_checkpoint(d / "ck", DiffGAP(get_preset("clap-tiny")))
    return d


def _eval_json(path, **settings):
    base = {"bridge_mode": "noise", "steps": 1, "samples": 1, "guidance_scale": 1.0}
    path.write_text(json.dumps({"tasks": {}, "fusion_settings": {**base, **settings}}))
    return path


def test_export_refuses_fusion_weights_chosen_for_other_bridge_settings(tiny_ckpt, tmp_path):
    from diffgap.export.provenance import check_export_args

    def args(**kw):
        base = dict(checkpoint=str(tiny_ckpt / "ck"), steps=None, bridge_mode=None, no_guidance_input=False,
                    fusion_weights=str(_eval_json(tmp_path / "e.json")))
        return argparse.Namespace(**{**base, **kw})

    check_export_args(args())                       # the checkpoint's defaults: noise, K=1, g=1
    check_export_args(args(fusion_weights=None))    # nothing to check
    for kw, word in ((dict(bridge_mode="source"), "bridge_mode"), (dict(steps=2), "steps")):
        with pytest.raises(UserError, match=word) as e:
            check_export_args(args(**kw))
        assert "\n" not in str(e.value) and "re-run `diffgap eval`" in str(e.value)
    with pytest.raises(UserError, match="samples"):
        check_export_args(args(fusion_weights=str(_eval_json(tmp_path / "n.json", samples=4))))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"tasks": {}}))
    with pytest.raises(UserError, match="does not record"):
        check_export_args(args(fusion_weights=str(old)))


def test_export_cli_refuses_mismatched_fusion_weights(tiny_ckpt, tmp_path, capsys):
    from diffgap.cli import main as cli_main

    rc = cli_main(["export", str(tiny_ckpt / "ck"), "--out", str(tmp_path / "ex"), "--encoders", "none",
                   "--bridge-mode", "source", "--fusion-weights", str(_eval_json(tmp_path / "e.json"))])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bridge_mode=noise" in err and "bridge_mode=source" in err
    assert not (tmp_path / "ex").exists()
