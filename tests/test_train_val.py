"""Validation-driven training: a tiny real run with early stopping, best-weight selection, the
schedule comparison recorded in the checkpoint, and the flags that do not combine with --val."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffgap import synth
from diffgap.checkpoint import load_checkpoint
from diffgap.cli import main as cli_main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_val")
    synth.write(d, replace(synth.SynthConfig(), n_train=1500, n_val=150, n_test=100))
    return d


def test_train_with_val_stops_early_keeps_the_best_weights_and_records_the_choice(data, tmp_path, capsys):
    n = torch.get_num_threads()
    rc = cli_main(["train", "--data", str(data / "train.npz"), "--val", str(data / "val.npz"), "--out", str(tmp_path / "ck"),
                   "--preset", "clap-tiny", "--no-progress", "--threads", "1"])
    torch.set_num_threads(n)
    assert rc == 0
    out = capsys.readouterr().out
    assert "chosen:" in out
    model, meta = load_checkpoint(tmp_path / "ck")
    rec = meta["validation"]
    tcfg = model.config.train
    assert set(rec["candidates"]) == {"two-stage", "joint"} and rec["chosen"] in rec["candidates"]
    assert "validation score" in rec["why"]
    scores = {k: c["final"]["score"] for k, c in rec["candidates"].items()}
    assert scores[rec["chosen"]] == max(scores.values())
    stages = rec["candidates"]["two-stage"]["stages"]
    caps = {"heads": tcfg.max_head_steps, "denoisers": tcfg.max_denoiser_steps}
    for name, st in stages.items():
        # early stopping triggered: the stage ended before its cap, after patience evaluations past the best
        assert st["steps_run"] < caps[name], (name, st["steps_run"])
        assert st["steps_run"] >= st["best_step"] + tcfg.patience * tcfg.val_every  # tiny preset: same for heads
        crit = [c for c in st["curve"] if c["step"] == st["best_step"]][0]
        key = "head_r1" if name == "heads" else "bridge_r1"
        assert crit[key] == max(c[key] for c in st["curve"])
    # the saved weights are the best evaluation's: re-validating them reproduces the recorded figure
    from diffgap.core.data import load_pairs
    from diffgap.train_val import validate

    val = load_pairs(data / "val.npz")
    V = {m: torch.from_numpy(val[m]) for m in model.config.modalities}
    noise = torch.randn(len(val), model.config.heads.dim, generator=torch.Generator().manual_seed(tcfg.seed + 17))
    rep = validate(model, V, noise)
    assert rep["score"] == pytest.approx(scores[rec["chosen"]], abs=1e-6)
    json.dumps(meta)  # JSON-able


@pytest.mark.parametrize("flag", [["--steps", "10"], ["--resume"], ["--stop-after", "3"]])
def test_val_refuses_flags_that_do_not_combine(data, tmp_path, capsys, flag):
    rc = cli_main(["train", "--data", str(data / "train.npz"), "--val", str(data / "val.npz"), "--out", str(tmp_path / "ck"),
                   "--preset", "clap-tiny", "--no-progress", *flag])
    assert rc == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "--val" in err and len(err.strip().splitlines()) == 1


def test_schedule_needs_val(data, tmp_path, capsys):
    rc = cli_main(["train", "--data", str(data / "train.npz"), "--out", str(tmp_path / "ck"), "--preset", "clap-tiny",
                   "--schedule", "joint", "--no-progress"])
    assert rc == 2 and "--val" in capsys.readouterr().err


def _pairs(kind: str, n: int, seed: int):
    """(text, audio) 32-d unit embeddings of shared 8-d factors s: audio from s linearly ("linear"), or
    from |s| ("fold": no linear map of the text recovers |s|, a nonlinear one does)."""
    from diffgap.core.data import Pairs

    rng = np.random.default_rng(seed)
    gen = np.random.default_rng(0)  # the maps: the same for every split
    A, B = gen.standard_normal((32, 8)), gen.standard_normal((32, 8))
    s = rng.standard_normal((n, 8))
    src = np.abs(s) - np.sqrt(2 / np.pi) if kind == "fold" else s
    t, a = s @ A.T + 0.1 * rng.standard_normal((n, 32)), src @ B.T + 0.1 * rng.standard_normal((n, 32))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return Pairs({"text": unit(t), "audio": unit(a)}, np.arange(n).astype(str))


@pytest.mark.parametrize("kind, expected", [("fold", 64), ("linear", 0)])
def test_validation_keeps_mlp_heads_only_where_they_gain(kind, expected):
    """Heads with a residual MLP are kept when the modalities are related nonlinearly, linear heads
    when a linear map suffices (the MLP's gain there is within validation noise)."""
    from diffgap.config import get_preset
    from diffgap.train_val import train_validated

    cfg = get_preset("clap-tiny").replace(embed_dim=32, **{"heads.hidden": 0, "train.head_mlp_hidden": 64,
                                                           "train.schedule": "two-stage"})
    model, rec = train_validated(cfg, _pairs(kind, 1500, 1), _pairs(kind, 300, 2), progress=False)
    heads = rec["heads"]
    assert set(heads["candidates"]) == {"linear", "mlp-64"}
    assert heads["hidden"] == expected == model.config.heads.hidden, heads["why"]
    assert (model.heads.heads["text"].mlp is not None) == (expected > 0)
    lo = heads["comparisons"]["mlp-64"]["val_gain_ci"][0]
    assert (lo > 0) == (expected > 0)


@pytest.mark.parametrize("name, decays", [("denoisers", 0), ("heads", 1)])
def test_a_stage_stops_after_its_allowed_lr_decays(name, decays):
    """run_stage on a criterion that never improves after the first evaluation: the stage ends after
    `patience` evaluations per allowed LR decay plus the final plateau; the heads and the
    denoiser-type stages have their own number of decays."""
    from diffgap.config import get_preset
    from diffgap.models import DiffGAP
    from diffgap.train_val import run_stage

    cfg = get_preset("clap-tiny").replace(**{"train.plateau_decays": 0, "train.head_plateau_decays": 1})
    tcfg = cfg.train
    model = DiffGAP(cfg)
    ema = DiffGAP(cfg)
    params = list(model.heads.parameters())
    scores = iter([1.0] + [0.0] * 100)
    st = run_stage(name, model, ema, params, tcfg, lambda step: sum((p ** 2).sum() for p in params),
                   lambda m: {"score": next(scores)}, "score", 10_000)
    every, patience = (tcfg.head_val_every, tcfg.head_patience) if name == "heads" else (tcfg.val_every, tcfg.patience)
    assert st.best_step == every and st.lr_decays == decays
    assert st.steps == every * (1 + patience * (decays + 1))
