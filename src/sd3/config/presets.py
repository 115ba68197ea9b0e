"""Named presets: the original system's stages (`sd3_256`, `sd3_512`, `sd3_1024`) and the CPU demo (`tiny`)."""

from __future__ import annotations

from sd3.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EncoderConfig,
    FlowConfig,
    LogConfig,
    ModelConfig,
    RankConfig,
    TrainConfig,
)

# The demo dataset's photos (sd3.data.demo builds it from them) -> (detailed caption, short caption). The
# tiny preset trains on them and samples its grids from the short ones, to compare with the photos.
DEMO_CAPTIONS: dict[str, tuple[str, str]] = {
    "astronaut": (
        "A smiling astronaut with short blond hair in an orange spacesuit poses in front of an American "
        "flag, with a white helmet at her side and a model of the space shuttle behind her.",
        "An astronaut in an orange spacesuit smiling for a portrait.",
    ),
    "cat": (
        "A close-up of a tabby cat with green eyes and a pink nose, looking slightly to the side against "
        "a soft, blurred background.",
        "A close-up of a tabby cat with green eyes.",
    ),
    "coffee": (
        "A cup of espresso with golden crema sits on a red saucer next to a silver spoon, on a worn "
        "wooden table.",
        "An espresso cup on a red saucer on a wooden table.",
    ),
    "rocket": (
        "A white rocket stands on its launch pad at dusk between tall lightning towers, under a deep blue"
        " sky, with bright lights glowing at its base.",
        "A rocket on a launch pad under a deep blue evening sky.",
    ),
    "tissue": (
        "A microscope image of stained tissue: brown-stained glands lined with rows of cells wind through"
        " pale blue connective tissue.",
        "A microscope image of brown and blue stained tissue.",
    ),
    "galaxies": (
        "A deep-field image of space crowded with distant galaxies, small spirals and glowing points of "
        "white, orange and blue scattered across a black background.",
        "Hundreds of colourful galaxies scattered across black space.",
    ),
    "retina": (
        "A photograph of the back of a human eye: an orange-red retina with dark branching blood vessels "
        "spreading from the bright optic disc, inside a black circular border.",
        "An orange retina with branching red blood vessels.",
    ),
    "cameraman": (
        "A black-and-white photograph of a man in a dark coat looking through a film camera on a tripod, "
        "standing on a lawn with buildings in the distance.",
        "A black-and-white photo of a man filming with a tripod camera.",
    ),
    "pagoda": (
        "An ornate Chinese pagoda with green-tiled roofs and red pillars rises among trees above a wide "
        "lake under a pale blue sky.",
        "A Chinese pagoda above a lake on a clear day.",
    ),
    "dahlia": (
        "An orange dahlia in full bloom with tightly layered petals, in sharp focus against a dark green "
        "blurred background.",
        "An orange dahlia against a dark green background.",
    ),
}
DEMO_PROMPTS: tuple[str, ...] = tuple(short for _, short in DEMO_CAPTIONS.values())
"""The short captions: the tiny preset's sample prompts."""


def _sd3(stage_res: int, batch_size: int, steps: int) -> Config:
    """The original system's stages: 19 blocks, width 64*19, 19 heads, SwiGLU 4.0, patch 2, lr 1e-4,
    warmup 1000, accumulation 2, EMA 0.99 every 100 optimizer steps, 2 loaders feeding 3 model GPUs each
    per 8-GPU node."""
    cfg = Config()
    cfg.preset = f"sd3_{stage_res}"
    cfg.model.max_res = stage_res
    cfg.model.max_res_orig = 256
    cfg.data.batch_size = batch_size
    cfg.data.dataset = f"data/cc12m_imagenet21k_{stage_res}"
    cfg.train.steps = steps
    cfg.run_dir = f"runs/sd3_{stage_res}"
    return cfg


def _sd3_large() -> Config:
    """Stage 1 at an SD3.5-Large-like shape (depth 38, width 2432, 38 heads of 64; arXiv 2403.03206 and the
    SD3.5 Large model card): 9.8 B parameters with this project's SwiGLU 4.0. Too large for a whole copy
    per model GPU: it trains sharded (train.parallel=fsdp, see --dry-run)."""
    cfg = _sd3(256, 32, 300_000)
    cfg.preset = "sd3_large"
    cfg.run_dir = "runs/sd3_large"
    cfg.model.depth, cfg.model.width, cfg.model.num_heads = 38, 2432, 38
    cfg.train.parallel = "fsdp"
    return cfg


def _tiny() -> Config:
    """CPU demo: random-init stand-in encoders, the pixel autoencoder, the bundled demo photos."""
    cfg = Config()
    cfg.preset = "tiny"
    cfg.model = ModelConfig(
        in_channels=48, patch_size=2, depth=4, width=192, num_heads=3, mlp_ratio=4.0,
        text_dims=(64, 48), pooled_dim=32, max_res=64, max_res_orig=64,
    )
    cfg.encoders = EncoderConfig(
        vae="pixel", vae_subfolder="", pixel_factor=4,
        text=("data/tiny_encoders/gemma", "data/tiny_encoders/bert"),
        pooled="data/tiny_encoders/clip", max_tokens=77, create_tiny=True, dtype="float32",
    )
    cfg.data = DataConfig(
        dataset="data/demo/64", batch_size=8, decode_workers=2, prefetch=2, create_demo=True, val_rows=32,
        short_caption_prob=1.0, small_buckets="fill",
    )
    cfg.train = TrainConfig(
        steps=800, lr=4e-3, schedule="cosine", warmup=50, accumulation_steps=1, ema_decay=0.99, ema_every=1,
        precision="fp32", activation_checkpointing=False, weight_decay=0.0,
    )
    # Uniform t, lr 4e-3 and 800 steps: chosen with tests/benchmarks/demo_quality.py; the logit-normal t and
    # lr 2e-3 of before left the samples less recognisable, at 500 steps more so (README, "Measured").
    cfg.flow = FlowConfig(t_sampling="uniform")
    cfg.ranks = RankConfig(loaders_per_node=1, models_per_loader=2, timeout_s=120)
    cfg.log = LogConfig(every=25, save_every=400, keep_last=2, sample_every=400, val_every=100,
                        sample_prompts=DEMO_PROMPTS, sample_steps=30, sample_cfg=5.0, wandb=False)
    cfg.run_dir = "runs/tiny"
    return cfg


PRESETS = {
    "tiny": _tiny,
    "sd3_256": lambda: _sd3(256, 140, 300_000),
    "sd3_512": lambda: _sd3(512, 40, 400_000),
    "sd3_1024": lambda: _sd3(1024, 15, 100_000),
    "sd3_large": _sd3_large,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


