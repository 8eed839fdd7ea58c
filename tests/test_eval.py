"""Retrieval metrics, fusion, bootstrap intervals, and the evaluation pipeline end to end."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffgap import synth
from diffgap.cli import main as cli_main
from diffgap.core.retrieval import (bootstrap_ci, choose_fusion_weights, cosine, fuse, metrics_from_ranks,
                               ranks_of_diagonal, simplex_grid)


def test_ranks_and_metrics_on_a_known_matrix():
    sim = np.array([[0.9, 0.1, 0.0],    # query 0: rank 1
                    [0.8, 0.5, 0.1],    # query 1: rank 2
                    [0.9, 0.8, 0.1]])   # query 2: rank 3
    r = ranks_of_diagonal(sim)
    assert list(r) == [1, 2, 3]
    m = metrics_from_ranks(r)
    assert m["R@1"] == pytest.approx(100 / 3) and m["R@5"] == 100.0 and m["MedR"] == 2.0
    assert m["mAP@10"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3) / 3)
    assert metrics_from_ranks(np.array([11, 12]))["mAP@10"] == 0.0


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    r = rng.integers(1, 20, size=500)
    lo, hi = bootstrap_ci(r, n_boot=500)
    assert lo <= metrics_from_ranks(r)["R@1"] <= hi
    assert bootstrap_ci(r, r, n_boot=200) == (0.0, 0.0)  # paired difference of a system with itself
    better = np.maximum(r - 5, 1)
    lo, hi = bootstrap_ci(better, r, n_boot=500)
    assert lo > 0


def test_fusion_weights_sum_to_one_and_pick_the_informative_matrix():
    assert all(abs(sum(w) - 1) < 1e-9 for w in simplex_grid(3, 0.25))
    assert len(simplex_grid(4, 0.1)) == 286
    rng = np.random.default_rng(0)
    good = np.eye(50) + 0.5 * rng.standard_normal((50, 50))
    noise = rng.standard_normal((50, 50))
    choice = choose_fusion_weights([noise, good], step=0.25)
    assert choice.weights[1] > choice.weights[0]
    assert choice.weights[0] < 0.5
    assert cosine(np.ones((2, 3)), np.ones((4, 3))).shape == (2, 4)


def test_fusion_of_complementary_matrices_against_a_brute_force_reference():
    """Two matrices that each identify a different half of the queries: the chosen weights are the
    grid point with the best R@1 computed independently (scipy's row z-score, argmax), fusing with
    them gives that R@1, and it beats either matrix alone by far."""
    from scipy.stats import zscore

    rng = np.random.default_rng(0)
    n = 80
    first = np.arange(n) < n // 2
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    a[np.arange(n), np.arange(n)] += np.where(first, 6.0, 0.0)
    b[np.arange(n), np.arange(n)] += np.where(first, 0.0, 6.0)

    def r1(s):
        return 100.0 * float(np.mean(np.argmax(s, axis=1) == np.arange(n)))

    grid = simplex_grid(2, 0.1)
    ref = {w: r1(w[0] * zscore(a, axis=1) + w[1] * zscore(b, axis=1)) for w in grid}
    choice = choose_fusion_weights([a, b], step=0.1)
    assert choice.val_r1 == pytest.approx(max(ref.values()))
    assert ref[choice.weights] == pytest.approx(choice.val_r1)
    assert metrics_from_ranks(ranks_of_diagonal(fuse([a, b], choice.weights)))["R@1"] == pytest.approx(choice.val_r1)
    assert 0.0 < choice.weights[0] < 1.0
    assert choice.val_r1 > max(r1(a), r1(b)) + 30.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained through the CLI on a small synthetic benchmark."""
    d = tmp_path_factory.mktemp("evalrun")
    synth.write(d / "data", replace(synth.SynthConfig(), n_train=1500, n_val=120, n_test=150))  # sizes differ on purpose
    n = torch.get_num_threads()
    rc = cli_main(["train", "--data", str(d / "data" / "train.npz"), "--out", str(d / "ck"), "--preset", "clap-tiny",
                   "--steps", "60", "--no-progress", "--threads", "1"])  # --threads sets the process-wide value
    torch.set_num_threads(n)
    assert rc == 0
    return d


def test_eval_cli_prints_every_row_and_writes_json(trained, capsys):
    d = trained
    rc = cli_main(["eval", "--checkpoint", str(d / "ck"), "--data", str(d / "data" / "test.npz"),
                   "--val", str(d / "data" / "val.npz"), "--json", str(d / "eval.json"),
                   "--noise-steps", "2", "--noise-samples", "2", "--bootstrap", "100", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads((d / "eval.json").read_text())
    for task in ("text->audio", "audio->text"):
        rows = res["tasks"][task]["rows"]
        assert sorted(rows) == sorted(["raw", "heads", "raw+heads", "q-bridge", "g-bridge", "q-bridge src", "q-bridge noise", "g-bridge src",
                              "g-bridge noise", "q+g bridges", "full", "linear adapter", "mean shift",
                              "regression bridge", "raw+heads+reg"])
        names = list(res["tasks"][task]["contrasts"])
        assert any(n.startswith("full - best baseline (") for n in names)
        assert any(n.startswith("full - best non-diffusion (") for n in names) and "full - linear adapter" in names
        for m in rows.values():
            assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100 and m["MedR"] >= 1
            lo, hi = m["R@1_ci"]
            assert lo <= m["R@1"] <= hi
            assert abs(sum(m["weights"].values()) - 1) < 1e-6
        assert "full - raw+heads" in res["tasks"][task]["contrasts"]
        # full fuses raw, heads and the retrieval bridges an export runs, nothing else
        assert sorted(rows["full"]["weights"]) == ["g-bridge", "heads", "q-bridge", "raw"]
        assert f"Retrieval {task}" in out
    # the raw row is plain cosine on the frozen embeddings
    from diffgap.core.data import load_pairs
    test = load_pairs(d / "data" / "test.npz")
    raw = metrics_from_ranks(ranks_of_diagonal(cosine(test["text"], test["audio"])))
    assert res["tasks"]["text->audio"]["rows"]["raw"]["R@1"] == pytest.approx(raw["R@1"])
    # mean shift: the raw query moved by the train-split mean difference, cosine to the raw gallery
    train = load_pairs(d / "data" / "train.npz")
    for q, g in (("text", "audio"), ("audio", "text")):
        shifted = test[q] - train[q].mean(0) + train[g].mean(0)
        sims = (shifted / np.linalg.norm(shifted, axis=1, keepdims=True)) @ (test[g] / np.linalg.norm(test[g], axis=1, keepdims=True)).T
        ref = 100 * np.mean((sims > np.diag(sims)[:, None]).sum(1) == 0)
        assert res["tasks"][f"{q}->{g}"]["rows"]["mean shift"]["R@1"] == pytest.approx(ref)
    prior = res["prior"]
    assert len(prior) == 2 * 7 and {r["bridge"] for r in prior} >= {"retrieval bridge", "diffusion from source", "regression bridge", "mean shift"}
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["frechet"] >= -1e-9 for r in prior)
    # the preset's retrieval bridge: K = 1 from noise (the denoiser's posterior mean), one sample
    assert res["fusion_settings"] == {"bridge_mode": "noise", "steps": 1, "samples": 1, "guidance_scale": 1.0}
    assert "generative prior" in out
    assert len(res["condition_usage"]) == 2 * 10
    assert all(r["t_lo"] < r["t_hi"] for r in res["condition_usage"])
    assert len(res["sanity"]) == 6 and all(s["finite"] for s in res["sanity"])
    assert "Condition usage" in out and "Sample sanity" in out


def test_eval_cli_refuses_mismatched_data(trained, tmp_path, capsys):
    from diffgap.core.data import save_pairs

    rng = np.random.default_rng(0)
    save_pairs(tmp_path / "v.npz", ids=[str(i) for i in range(4)], text=rng.standard_normal((4, 16)),
               audio=rng.standard_normal((4, 16)))
    rc = cli_main(["eval", "--checkpoint", str(trained / "ck"), "--data", str(tmp_path / "v.npz"),
                   "--val", str(tmp_path / "v.npz")])
    assert rc == 2 and "has embedding dim 16, but the model takes 512-d" in capsys.readouterr().err
    rc = cli_main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path / "v.npz"),
                   "--val", str(tmp_path / "v.npz")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_linear_adapter_row_is_the_linear_heads_only_when_they_were_trained_as_the_adapter(tmp_path, capsys):
    """Linear heads trained alone under validation (two-stage) on the controls' split *are* the linear
    adapter: eval reuses them (the row equals the heads row). Trained elsewhere, or on another split
    file, the adapter is trained as its own control."""
    import shutil

    from diffgap.checkpoint import load_checkpoint
    from diffgap.commands.eval import heads_trained_as_adapter

    d = tmp_path
    synth.write(d / "data", replace(synth.SynthConfig(), n_train=800, n_val=100, n_test=100))
    n = torch.get_num_threads()
    rc = cli_main(["train", "--data", str(d / "data" / "train.npz"), "--val", str(d / "data" / "val.npz"),
                   "--schedule", "two-stage", "--out", str(d / "ck"), "--preset", "clap-tiny-gen", "--no-progress",
                   "--threads", "2"])  # two threads: one is lent to the controls' process during the denoiser stage
    torch.set_num_threads(n)
    assert rc == 0
    model, meta = load_checkpoint(d / "ck")
    assert heads_trained_as_adapter(model, meta, str(d / "data" / "train.npz"))
    shutil.copy(d / "data" / "train.npz", d / "copy.npz")
    assert not heads_trained_as_adapter(model, meta, str(d / "copy.npz"))
    assert not heads_trained_as_adapter(model, {**meta, "validation": {"chosen": "joint"}}, str(d / "data" / "train.npz"))
    common = ["--data", str(d / "data" / "test.npz"), "--val", str(d / "data" / "val.npz"), "--noise-steps", "2",
              "--noise-samples", "2", "--bootstrap", "50", "--threads", "1"]
    for name, extra in (("own", []), ("copy", ["--train", str(d / "copy.npz")])):
        rc = cli_main(["eval", "--checkpoint", str(d / "ck"), "--json", str(d / f"{name}.json"), *common, *extra])
        torch.set_num_threads(n)
        assert rc == 0
    out = capsys.readouterr().out
    own, copy = (json.loads((d / f"{k}.json").read_text()) for k in ("own", "copy"))
    assert "source" in own["controls"]["linear adapter"] and "steps_run" not in own["controls"]["linear adapter"]
    assert "steps_run" in copy["controls"]["linear adapter"]
    # `diffgap train` fitted the controls beside the denoiser stage; eval used them for its own split,
    # and trained its own for the other split file (another adapter rule, so another key)
    assert (d / "ck" / "controls" / "controls.json").exists()
    assert "cache" in own["controls"]["regression bridge"] and "cache" not in copy["controls"]["regression bridge"]
    assert "= the heads" in out
    for task in ("text->audio", "audio->text"):
        rows = own["tasks"][task]["rows"]
        for k in ("R@1", "R@5", "R@10", "mAP@10", "MedR"):
            assert rows["linear adapter"][k] == rows["heads"][k]


def test_cached_controls_are_the_ones_trained_and_a_stale_cache_is_refused(tmp_path):
    """The controls saved by `diffgap train` load back equal to what was trained; a cache for other
    heads (another key) or with a damaged weights file is not used."""
    from diffgap.checkpoint import load_checkpoint
    from diffgap.core.data import load_pairs
    from diffgap.eval_controls import BackgroundControls, controls_key, fit_controls, load_controls

    d = tmp_path
    synth.write(d / "data", replace(synth.SynthConfig(), n_train=600, n_val=80, n_test=80))
    n = torch.get_num_threads()
    rc = cli_main(["train", "--data", str(d / "data" / "train.npz"), "--out", str(d / "ck"), "--preset", "clap-tiny",
                   "--steps", "20", "--no-progress", "--threads", "1"])
    torch.set_num_threads(n)
    assert rc == 0
    model, _ = load_checkpoint(d / "ck")
    train, val = load_pairs(d / "data" / "train.npz"), load_pairs(d / "data" / "val.npz")
    side = BackgroundControls(model, str(d / "data" / "train.npz"), str(d / "data" / "val.npz"), False, d)
    dest = side.finish(d / "ck")
    assert dest is not None and not list(d.glob(".controls.*"))
    key = controls_key(model, train, val, False)
    adapter, bridges, info = load_controls(dest, model, key, False)
    ref = fit_controls(model, train, val)  # the same training, in this process
    for direction, net in bridges.items():
        for (k, v), (k2, v2) in zip(net.state_dict().items(), ref["bridges"][direction].state_dict().items()):
            assert k == k2 and torch.allclose(v, v2, atol=1e-5), k
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), ref["adapter"].state_dict().items()):
        assert k == k2 and torch.allclose(v, v2, atol=1e-5), k
    assert info["regression bridge"]["best_step"] == ref["info"]["regression bridge"]["best_step"]
    # other heads: another key, the cache is not used
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.01)
    assert controls_key(model, train, val, False) != key
    assert load_controls(dest, model, controls_key(model, train, val, False), False) is None
    # a damaged weights file is not used either
    w = dest / "controls.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    assert load_controls(dest, model, key, False) is None
