"""Stand-ins: random-init encoders built locally in a second or two, and the demo dataset.

    ensure(cfg, dataset=True, encoders=True)         # the tiny preset: create what is missing, and say so
    make_tiny_encoders(cfg.encoders, cfg.model)    # writes stand-ins at the paths cfg.encoders names
    cfg = tiny_config(tmp_path)                    # the `tiny` preset pointed at fresh stand-ins (tests)

The encoders have the architectures of the real ones (Gemma-2, ModernBERT, a full CLIP checkpoint, a
FLUX-style AutoencoderKL) at toy sizes, seeded random weights (the same every time), and one byte-level
BPE tokenizer trained here on a generated caption corpus. They are saved with `save_pretrained` and
loaded back through the real loading code (`sd3.encode.encoders`), so tests and the CPU demo exercise the same
path as a real run. They make the pipeline run; they cannot make good images. Nothing is downloaded.

`ensure` creates them only inside the preset's own folders (`STAND_IN_DIR`, and `DEMO_DIR` for the
demo photos), never at another missing path: a mistyped directory or hub id must fail, naming it, not
train silently on random weights. Only the entry scripts call it; no runtime module imports this one.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sd3.atomic import build_atomically
from sd3.config import Config, ConfigError, EncoderConfig, ModelConfig, preset
from sd3.paths import resolve

VOCAB_SIZE = 1280
SEED = 0

# Special tokens of the three tokenizer families: Gemma (<bos> ... , pad <pad>), ModernBERT
# ([CLS] ... [SEP], pad [PAD]) and CLIP (<|startoftext|> ... <|endoftext|>, padded with <|endoftext|>).
_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             "<|startoftext|>", "<|endoftext|>"]

# The FLUX.1 autoencoder's latent statistics (black-forest-labs/FLUX.1-schnell, vae/config.json), so the
# stand-in exercises the same (z - shift) * scale convention with realistic numbers.
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


STAND_IN_DIR = "data/tiny_encoders"
"""Where `encoders.create_tiny` may create stand-ins (relative to the repository root)."""
DEMO_DIR = "data/demo"
"""Where `data.create_demo` may build the demo dataset (relative to the repository root)."""


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def ensure(cfg: Config, *, dataset: bool = True, encoders: bool = True, log=print) -> list[Path]:
    """What the config asks to be created and is missing: the demo dataset (`data.create_demo`) and the
    stand-in encoders (`encoders.create_tiny`), each only inside its own folder. Says what it created.
    Returns the folders written."""
    written: list[Path] = []
    if dataset and cfg.data.create_demo:
        from sd3.data.demo import ensure_demo_dataset
        from sd3.data.index import default_index_path

        target = resolve(cfg.data.dataset)
        index = resolve(cfg.data.index) if cfg.data.index else default_index_path(target)
        if not index.is_file() and _inside(target, DEMO_DIR):
            ensure_demo_dataset(target, max_res=cfg.model.max_res, multiple=cfg.pixel_multiple)
            log(f"built the demo dataset at {target} (real photos bundled with scikit-image and scikit-learn)")
            written.append(target)
    if encoders and cfg.encoders.create_tiny:
        enc = _inside_only(cfg.encoders)
        made = make_tiny_encoders(enc, cfg.model)
        if made:
            log(f"created random-init stand-in encoders at {', '.join(map(str, made))}: they make the "
                "pipeline run, not good images (point --encoders.* at real models to train for real)")
        written += made
    return written


def _inside(path: Path, folder: str) -> bool:
    return resolve(path).is_relative_to(resolve(folder))


def _inside_only(enc: EncoderConfig) -> EncoderConfig:
    """`enc` with every source outside STAND_IN_DIR replaced by a path that is never created (so it
    loads, or fails naming itself, exactly as without stand-ins)."""
    import dataclasses

    keep = lambda source: source if _inside(Path(source), STAND_IN_DIR) else None  # noqa: E731
    return dataclasses.replace(enc, text=tuple(keep(s) for s in enc.text), pooled=keep(enc.pooled),
                               vae=enc.vae if enc.vae == "pixel" else keep(enc.vae))


def make_tiny_encoders(enc: EncoderConfig, model: ModelConfig) -> list[Path]:
    """Create random-init stand-ins at the paths `enc` names: `enc.text[i]` (Gemma-2 for even i,
    ModernBERT for odd i, width `model.text_dims[i]`), `enc.pooled` (a full CLIP checkpoint with
    projection width `model.pooled_dim`) and, unless `enc.vae == 'pixel'`, `enc.vae`/`enc.vae_subfolder`
    (an AutoencoderKL with `model.in_channels` latent channels, factor 8).

    Complete directories are left alone; each new one is written to a temporary sibling and renamed into
    place, so two processes racing here both end with the same complete directory. Returns the
    directories this call wrote."""
    if len(model.text_dims) != len(enc.text):
        raise ConfigError(f"model.text_dims has {len(model.text_dims)} entries but encoders.text names "
                          f"{len(enc.text)} encoders: give one width per text encoder")
    jobs: list[tuple[str, str | None, Callable[[Path], None]]] = []
    for i, (path, width) in enumerate(zip(enc.text, model.text_dims)):
        build = _build_gemma2 if i % 2 == 0 else _build_modernbert
        jobs.append((f"encoders.text[{i}]", path, functools.partial(build, width=width,
                                                                     key=f"model.text_dims[{i}]")))
    jobs.append(("encoders.pooled", enc.pooled, functools.partial(_build_clip, width=model.pooled_dim)))
    if enc.vae != "pixel":
        vae = None if enc.vae is None else str(Path(enc.vae) / (enc.vae_subfolder or ""))
        jobs.append(("encoders.vae", vae, functools.partial(_build_autoencoder, channels=model.in_channels)))
    written = []
    for key, source, build in jobs:
        if source is None:  # not ours to create (see `ensure`)
            continue
        target = resolve(source)
        build = functools.partial(_quietly, build)
        needs_tokenizer = key != "encoders.vae"
        if _is_complete(target, tokenizer=needs_tokenizer):
            continue
        if target.exists() and any(target.iterdir()):
            raise ConfigError(f"{key}: {str(target)!r} exists but holds no complete model; delete it or "
                              f"point {key} elsewhere to have a stand-in created there")
        if _write_atomically(target, build, tokenizer=needs_tokenizer):
            written.append(target)
    return written


def tiny_config(root: str | Path, *, vae: str = "pixel") -> Config:
    """The `tiny` preset with its encoders under `root`, created (for tests). `vae='flux'` swaps the
    pixel autoencoder for a tiny 16-channel FLUX-style AutoencoderKL (and sets model.in_channels=16)."""
    if vae not in ("pixel", "flux"):
        raise ValueError(f"tiny_config: vae={vae!r} must be 'pixel' or 'flux'")
    root = Path(root)
    cfg = preset("tiny")
    cfg.encoders.text = (str(root / "gemma"), str(root / "bert"))
    cfg.encoders.pooled = str(root / "clip")
    if vae == "flux":
        cfg.encoders.vae, cfg.encoders.vae_subfolder = str(root / "flux"), "vae"
        cfg.model.in_channels = 16
    make_tiny_encoders(cfg.encoders, cfg.model)
    return cfg.validate()


def stand_in_configs(enc: EncoderConfig, model: ModelConfig) -> dict[str, object]:
    """The configs `make_tiny_encoders` would write, without writing anything: config key -> a transformers
    config (text encoders; the full CLIP for `encoders.pooled`) or the AutoencoderKL's keyword arguments
    (`encoders.vae`, unless 'pixel'). Their sizes are exact: the tokenizer's vocabulary is `VOCAB_SIZE`."""
    out: dict[str, object] = {}
    for i, width in enumerate(model.text_dims):
        # Token ids do not change a size; ModernBERT's defaults (50281...) lie outside the stand-in vocabulary.
        out[f"encoders.text[{i}]"] = (_gemma2_config(width) if i % 2 == 0 else _modernbert_config(
            width, pad_token_id=0, bos_token_id=1, cls_token_id=1, eos_token_id=2, sep_token_id=2))
    out["encoders.pooled"] = _clip_config(model.pooled_dim)
    if enc.vae != "pixel":
        out["encoders.vae"] = _autoencoder_config(model.in_channels)
    return out


def caption_corpus(n: int = 4000, seed: int = SEED) -> list[str]:
    """`n` English-like captions from a seeded grammar (the tokenizer's training text; also handy as test
    captions). Deterministic: the same (n, seed) always gives the same list."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(_TEMPLATES)
        words = {k: rng.choice(v) for k, v in _WORDS.items()}
        out.append(template.format(number=rng.randint(1, 9999), **words))
    return out


# --------------------------------------------------------------------------------------------------
# Writing a directory once
# --------------------------------------------------------------------------------------------------


def _is_complete(path: Path, *, tokenizer: bool) -> bool:
    has_weights = any(path.glob("*.safetensors"))
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return (path / "config.json").is_file() and has_weights and (has_tokenizer or not tokenizer)


def _write_atomically(target: Path, build: Callable[[Path], None], *, tokenizer: bool) -> bool:
    """Build into a private temporary sibling, then publish it as `target` (`sd3.atomic`). Returns False
    when another process got there first (rename is atomic: its directory is complete, and it is the same
    seeded stand-in)."""
    if build_atomically(target, build, folder=True, replace=False):
        return True
    if not _is_complete(target, tokenizer=tokenizer):
        raise ConfigError(f"{target} appeared while a stand-in was built there, but holds no complete model")
    return False


# --------------------------------------------------------------------------------------------------
# The stand-ins
# --------------------------------------------------------------------------------------------------


def _quietly(build: Callable[[Path], None], out: Path) -> None:
    """Run `build(out)` without transformers' progress bars (a stand-in saves in milliseconds)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        build(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@functools.cache
def _bpe():
    """One byte-level BPE (the GPT-2 / ModernBERT family), trained here on the generated corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(caption_corpus(), trainer)
    return tok


def _tokenizer(template: tuple[str, ...], **special_tokens: str):
    """The shared BPE with `template` (special tokens around $A) as its post-processor, wrapped for
    transformers with the given special tokens."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_bpe().to_str())
    used = [t for t in template if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(template), special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(used)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1_000_000, **special_tokens)


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Same weights every time, without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def _check_width(key: str, width: int) -> None:
    # Two heads whose width is even (rotary embeddings rotate pairs).
    if width < 4 or width % 4:
        raise ConfigError(f"{key}={width}: a stand-in text encoder needs a width that is a positive multiple "
                          "of 4 (two heads, rotary pairs); pick e.g. 64")


def _gemma2_config(width: int, vocab_size: int = VOCAB_SIZE, **token_ids: int):
    from transformers import Gemma2Config

    head_dim = width // 2
    return Gemma2Config(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=512, **token_ids,
    )


def _build_gemma2(out: Path, *, width: int, key: str) -> None:
    from transformers import AutoModel

    _check_width(key, width)
    tok = _tokenizer(("<bos>", "$A"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                     unk_token="<unk>")
    config = _gemma2_config(width, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    # No attn_implementation="sdpa": Gemma-2 soft-caps its attention logits, which SDPA cannot do, and
    # transformers refuses it for Gemma2Model.
    with _seeded():
        model = AutoModel.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _modernbert_config(width: int, vocab_size: int = VOCAB_SIZE, **token_ids: int):
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=512, local_attention=16, **token_ids,
    )


def _build_modernbert(out: Path, *, width: int, key: str) -> None:
    from transformers import AutoModel

    _check_width(key, width)
    tok = _tokenizer(("[CLS]", "$A", "[SEP]"), cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                     unk_token="[UNK]", mask_token="[MASK]")
    # ModernBERT's default special-token ids (50281...) lie outside a tiny vocabulary: set them all.
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           [("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]")]}
    config = _modernbert_config(width, len(tok), pad_token_id=ids["pad"], bos_token_id=ids["cls"],
                                cls_token_id=ids["cls"], eos_token_id=ids["sep"], sep_token_id=ids["sep"])
    with _seeded():
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _clip_config(width: int, vocab_size: int = VOCAB_SIZE, **token_ids: int):
    from transformers import CLIPConfig

    # The projection width is given only at the top level, as in converted checkpoints: the nested
    # configs keep their default projection_dim (512), which the loader must not trust.
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, **token_ids)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def _build_clip(out: Path, *, width: int) -> None:
    """A full CLIPModel (text and vision towers), as MetaCLIP ships, so the loader's path that takes the
    text tower with its projection out of a full checkpoint is the one tested."""
    from transformers import AutoModel, CLIPImageProcessor

    if width < 1:
        raise ConfigError(f"model.pooled_dim={width} must be positive")
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    # OpenAI CLIP pads with its EOS token; the model pools at the first EOS of each row.
    tok = _tokenizer((bos, "$A", eos), bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos)
    config = _clip_config(width, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    with _seeded():
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # CLIP's own preprocessing at the tower's 32 px, so the checkpoint also serves image-text scoring
    # (sd3.eval.scores.ClipScore) as a full CLIP checkpoint does.
    side = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out)


def _autoencoder_config(channels: int) -> dict:
    """A FLUX-shaped AutoencoderKL at toy width: four blocks (factor 8), no quant convs, FLUX's
    scaling and shift factors."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def _build_autoencoder(out: Path, *, channels: int) -> None:
    from diffusers import AutoencoderKL

    if channels < 1:
        raise ConfigError(f"model.in_channels={channels} must be positive")
    with _seeded():
        vae = AutoencoderKL(**_autoencoder_config(channels))
    vae.save_pretrained(out)


# --------------------------------------------------------------------------------------------------
# The caption grammar
# --------------------------------------------------------------------------------------------------

_WORDS = {
    "adj": ("red", "blue", "green", "yellow", "small", "large", "old", "young", "bright", "dark", "wooden",
            "golden", "quiet", "busy", "snowy", "sunny", "misty", "tiny", "ancient", "modern", "striped",
            "fluffy", "shiny", "rusty", "colorful", "empty", "crowded", "calm", "wild", "soft"),
    "noun": ("cat", "dog", "horse", "astronaut", "rocket", "cup of coffee", "bicycle", "tree", "house",
             "mountain", "river", "bridge", "car", "boat", "bird", "flower", "child", "woman", "man",
             "castle", "lighthouse", "robot", "teapot", "guitar", "forest", "city street", "beach", "train",
             "owl", "fox", "elephant", "apple", "book", "lamp", "chair", "window", "cloud", "candle"),
    "place": ("on a wooden table", "in a field", "at sunset", "under a clear blue sky", "on the beach",
              "in the snow", "next to a window", "in a busy market", "on a mountain top", "in the rain",
              "at night", "in a garden", "by the sea", "in a forest", "on a city street", "in space"),
    "verb": ("sitting", "standing", "running", "sleeping", "riding a horse", "flying", "reading a book",
             "looking at the camera", "playing", "walking", "resting", "jumping", "floating", "glowing"),
    "style": ("a photograph", "a painting", "a watercolor", "a sketch", "a close-up photo", "a 3d render",
              "an oil painting", "a pencil drawing", "a wide shot", "a film still", "a poster", "a photo"),
    "light": ("soft light", "golden hour light", "dramatic shadows", "studio lighting", "morning fog",
              "neon light", "candlelight", "overcast light", "harsh midday sun", "moonlight", "backlight"),
    "material": ("glass", "marble", "porcelain", "velvet", "copper", "concrete", "paper", "leather", "silk",
                 "bamboo", "granite", "ceramic", "plastic", "wool", "linen", "brass", "ivory", "clay"),
    "thing": ("umbrella", "kettle", "telescope", "violin", "sandcastle", "windmill", "typewriter",
              "compass", "lantern", "hammock", "carousel", "greenhouse", "skyscraper", "submarine",
              "helicopter", "waterfall", "volcano", "canyon", "glacier", "meadow", "orchard", "vineyard",
              "harbor", "desert", "penguin", "giraffe", "dolphin", "butterfly", "squirrel", "turtle",
              "peacock", "hedgehog", "strawberry", "pineapple", "croissant", "sandwich", "pumpkin",
              "mushroom", "cactus", "sunflower"),
    "count": ("two", "three", "four", "several", "many", "a dozen", "a pair of", "five"),
    "color": ("crimson", "turquoise", "lavender", "emerald", "amber", "magenta", "ochre", "indigo", "silver",
              "charcoal", "beige", "maroon", "teal", "scarlet", "navy", "olive"),
}
_TEMPLATES = (
    "{style} of a {adj} {noun} {place}",
    "a {adj} {noun} {verb} {place}",
    "{style} of a {noun} {verb} {place}, {light}",
    "A {adj} {noun}. The {noun} is {verb} {place}.",
    "{adj} {noun}, {light}, {style}",
    "close up of a {adj} {noun} with a {adj} background",
    "two {adj} {noun}s {verb} {place}",
    "The image shows a {adj} {noun} {verb} {place}. In the background there is a {adj} {noun} in {light}.",
    "{count} {color} {thing}s made of {material} {place}",
    "a {material} {thing} beside a {color} {noun}, {style}",
    "{style} of a {thing} {place}, {color} and {color} tones, {light}",
    "Photo: {thing} ({material}), {count} of them, {place}; shot #{number} in {light}",
)
