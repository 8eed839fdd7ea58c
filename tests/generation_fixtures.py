"""Tiny random-weight CLAP models and AudioLDM / MusicLDM generator folders, built from configs.

The component sizes follow the fast pipeline tests of diffusers (``get_dummy_components`` in its
``tests/pipelines/audioldm`` and ``tests/pipelines/musicldm``): a two-level UNet with a
``simple_projection`` class embedding of the CLAP projection width, a one-channel VAE, a small
SpeechT5 HiFi-GAN vocoder. The tokenizer is a byte-level BPE with no merges over the 256 byte
symbols (written here: no hub access), which ``RobertaTokenizer`` loads like roberta-base's files.
Folders are written with ``save_pretrained``: the layout a user's real generator folder has.
"""
from __future__ import annotations

import json
from pathlib import Path

PROJECTION_DIM = 512  # the CLAP projection width = the UNet's class-embedding input width (as real CLAP)
VOCODER_RATE = 16000


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet (Radford et al. 2019): printable bytes map to themselves, the rest
    to code points from 256 upwards, so every byte string has a printable spelling."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tokenizer(folder: Path) -> Path:
    """A byte-level BPE vocabulary (special tokens + the 256 byte symbols, no merges) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _byte_symbols():
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def tokenizer(folder: Path):
    from transformers import RobertaTokenizer

    write_tokenizer(folder)
    return RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def text_config():
    from transformers import ClapTextConfig

    return ClapTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=32,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5,
                          projection_dim=PROJECTION_DIM)


def clap_model(seed: int = 0):
    """A full ``transformers.ClapModel`` (text + audio towers) with random weights."""
    import torch
    from transformers import ClapAudioConfig, ClapConfig, ClapModel

    audio = ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=37, layer_norm_eps=1e-5,
                            depths=[2, 2], num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=192,
                            patch_size=2, patch_stride=2, patch_embed_input_channels=4)
    cfg = ClapConfig(text_config=text_config().to_dict(), audio_config=audio.to_dict(), projection_dim=PROJECTION_DIM)
    torch.manual_seed(seed)
    return ClapModel(cfg).eval()


def feature_extractor():
    from transformers import ClapFeatureExtractor

    # hop 7,900 samples: a 10 s 48 kHz clip gives 61 mel frames, within the tiny tower's 64-frame spectrogram
    return ClapFeatureExtractor(hop_length=7900)


def _generator_parts(seed: int = 0) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(32, 64), class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=PROJECTION_DIM, class_embeddings_concat=True,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=1, out_channels=1,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)
    torch.manual_seed(seed)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=VOCODER_RATE, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False))
    return {"unet": unet, "scheduler": scheduler, "vae": vae, "vocoder": vocoder}


def tiny_audioldm(folder: Path, seed: int = 0) -> Path:
    """An AudioLDM folder: text tower only (``ClapTextModelWithProjection``), as AudioLDM ships."""
    import torch
    from diffusers import AudioLDMPipeline
    from transformers import ClapTextModelWithProjection

    torch.manual_seed(seed)
    text = ClapTextModelWithProjection(text_config()).eval()
    pipe = AudioLDMPipeline(text_encoder=text, tokenizer=tokenizer(folder / "_tok"), **_generator_parts(seed))
    pipe.save_pretrained(str(folder))
    return folder


def tiny_musicldm(folder: Path, seed: int = 0) -> Path:
    """A MusicLDM folder: a full ``ClapModel`` (text + audio towers) and its feature extractor."""
    from diffusers import MusicLDMPipeline

    pipe = MusicLDMPipeline(text_encoder=clap_model(seed), tokenizer=tokenizer(folder / "_tok"),
                            feature_extractor=feature_extractor(), **_generator_parts(seed))
    pipe.save_pretrained(str(folder))
    return folder


def tiny_clap_folder(folder: Path, seed: int = 0) -> Path:
    """A local ``ClapModel`` folder (model + tokenizer + feature extractor), as ``save_pretrained`` writes it."""
    clap_model(seed).save_pretrained(str(folder))
    tokenizer(folder / "_tok").save_pretrained(str(folder))
    feature_extractor().save_pretrained(str(folder))
    return folder


def perturbed_model(seed: int = 0, preset: str = "clap-tiny-gen"):
    """A square-heads preset with perturbed (still invertible) heads and non-trivial denoiser outputs."""
    import torch

    from diffgap.config import get_preset
    from diffgap.models import DiffGAP

    torch.manual_seed(seed)
    m = DiffGAP(get_preset(preset))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for head in m.heads.heads.values():
            head.linear.bias.normal_(0.0, 0.01)
    return m.eval()
