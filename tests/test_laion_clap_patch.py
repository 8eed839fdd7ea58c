"""diffgap.encoders.laion_clap_patch: each replacement against the laion-clap function it replaces.

Same output as stock on a small input/model, stock restored after the ``with`` block (also on error),
and any laion-clap version but the one the replacements copy is refused.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("laion_clap")

from diffgap.encoders import laion_clap_patch as P  # noqa: E402

factory, htsat, clap_model = P.import_laion_clap()


@pytest.mark.parametrize("batch", [1, 3])
def test_window_reverse_same_as_stock(batch):
    ws, H, W, C = 4, 8, 12, 5
    windows = torch.randn(batch * (H // ws) * (W // ws), ws, ws, C, generator=torch.Generator().manual_seed(batch))
    torch.testing.assert_close(P.window_reverse_any_batch(windows, ws, H, W), htsat.window_reverse(windows, ws, H, W),
                               rtol=0, atol=0)


def test_window_reverse_scoped_reentrant_and_restored():
    stock = htsat.window_reverse
    with P.batch_agnostic_htsat():
        assert htsat.window_reverse is P.window_reverse_any_batch
        with P.batch_agnostic_htsat():
            pass
        assert htsat.window_reverse is P.window_reverse_any_batch  # the inner exit does not restore early
    assert htsat.window_reverse is stock
    with pytest.raises(RuntimeError, match="boom"):
        with P.batch_agnostic_htsat():
            raise RuntimeError("boom")
    assert htsat.window_reverse is stock


def _audio_cfg(name: str = "HTSAT-tiny"):
    return clap_model.CLAPAudioCfp(**P.model_config(name)["audio_cfg"])


def test_htsat_size_same_as_stock_for_laion_sizes():
    """With laion-clap's own HTSAT-tiny sizes the replacement builds the stock model, weight for weight."""
    cfg = _audio_cfg()
    torch.manual_seed(0)
    stock_model = htsat.create_htsat_model(cfg)
    stock_fn = clap_model.create_htsat_model
    with P.htsat_size({"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [4, 8, 16, 32]}):
        torch.manual_seed(0)
        ours = clap_model.create_htsat_model(cfg)
    assert clap_model.create_htsat_model is stock_fn
    a, b = stock_model.state_dict(), ours.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_htsat_size_overrides_and_restores():
    stock_fn = clap_model.create_htsat_model
    with pytest.raises(RuntimeError, match="boom"):
        with P.htsat_size({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}):
            m = clap_model.create_htsat_model(_audio_cfg())
            assert m.patch_embed.proj.out_channels == 16 and len(m.layers) == 4
            raise RuntimeError("boom")
    assert clap_model.create_htsat_model is stock_fn


def test_roberta_from_config_same_tower_as_stock_from_pretrained(tmp_path):
    """Stock ``RobertaModel.from_pretrained`` on a saved tower vs the patched
    ``from_pretrained('roberta-base')`` given only that tower's config: the same architecture, so a
    CLAP checkpoint's text-branch weights load strictly and give the stock model's outputs; and the
    patched call reads no weights (HF_HUB_OFFLINE: it never reaches the hub)."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=80)).save_pretrained(tmp_path)
    stock_cls = clap_model.RobertaModel
    ref = stock_cls.from_pretrained(str(tmp_path)).eval()  # the stock path: config + weights from disk
    with P.roberta_from_config(RobertaConfig.from_json_file(str(tmp_path / "config.json"))):
        torch.manual_seed(1)
        ours = clap_model.RobertaModel.from_pretrained("roberta-base").eval()
    assert clap_model.RobertaModel is stock_cls
    assert type(ours) is type(ref)
    a, b = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not torch.equal(a["encoder.layer.0.attention.self.query.weight"], b["encoder.layer.0.attention.self.query.weight"])
    ours.load_state_dict(a, strict=True)  # what loading a CLAP checkpoint does right after
    ids = torch.tensor([[0, 5, 17, 42, 2, 1], [0, 9, 2, 1, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        want, got = ref(input_ids=ids, attention_mask=mask), ours(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)


def test_model_config_equals_laion_factory_table():
    """The bundled JSON read directly == the private factory table it replaces, for every model."""
    for name, table_cfg in factory._MODEL_CONFIGS.items():
        assert P.model_config(name) == json.loads(json.dumps(table_cfg)), name
    with pytest.raises(ValueError, match="no model config 'nope'"):
        P.model_config("nope")


def test_other_laion_clap_version_refused(monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda n: "1.2.0" if n == "laion_clap" else real(n))
    stock = htsat.window_reverse
    with pytest.raises(ImportError, match=r"laion-clap 1\.1\.7 internals.*1\.2\.0 is installed.*pip install laion-clap==1\.1\.7"):
        with P.batch_agnostic_htsat():
            pass
    assert htsat.window_reverse is stock
