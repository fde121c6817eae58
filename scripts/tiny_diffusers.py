"""
Write a tiny random-weight Stable Diffusion pipeline to a folder, offline: for tests, benchmarks and a CPU demo.

    python scripts/tiny_diffusers.py /tmp/tiny-sd

It is built the way diffusers tests itself (`get_dummy_components()`): a small UNet, VAE and CLIP text encoder
from configs, and a CLIP tokenizer whose vocabulary is the 256 byte symbols, so nothing is downloaded. The images
are noise, but every step of loading and generating is the real code path of a full-size model.
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HIDDEN = 32


def tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every byte is one token."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = ["<|startoftext|>", "<|endoftext|>", *symbols, *(f"{s}</w>" for s in symbols)]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[], model_max_length=77)


def build(folder: Path, seed: int = 0, vae_scale_factor: int = 2) -> Path:
    """
    Save the tiny pipeline in `folder` (created if needed) and return it.

    `vae_scale_factor` (2, 4 or 8) is how much smaller than the image its latent is: 8 as in Stable Diffusion, for
    benchmarks at real sizes (a 512² image is a 64² latent); 2, the default, keeps tests of tiny images cheap.
    """
    torch.manual_seed(seed)
    vae_blocks = {2: 2, 4: 3, 8: 4}[vae_scale_factor]
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, *(16,) * (vae_blocks - 1)), in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
    )  # fmt: skip
    with torch.no_grad():  # a trained VAE encodes with a small variance: so does this one (img2img samples from it)
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -20
    tok = tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77,
        )
    )  # fmt: skip
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder)
    return folder


def main() -> None:
    """Build the model in the folder given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    print(build(parser.parse_args().folder))


if __name__ == "__main__":
    main()
