"""Fixtures for the recaptioning tests (sd3.data.recaption): tiny models, parquet shards, fake captioners.

The tiny models are random-config LLaVA (CLIP vision tower + Llama) and Llama causal LMs with a word-level
tokenizer trained here in milliseconds, saved with `save_pretrained` so the package's real loading code
(`AutoProcessor` / `AutoModelForImageTextToText`, `AutoTokenizer` / `AutoModelForCausalLM`) is what runs.
A word-level vocabulary makes their random output a string of real words, so it can pass the filters.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Images and shards
# --------------------------------------------------------------------------------------------------


@functools.cache
def _photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def image_size(row_id: int) -> tuple[int, int]:
    """A distinct (width, height) per row, so a caption that names its image's size names its row."""
    return 40 + row_id, 30 + row_id % 7


def photo_bytes(row_id: int, fmt: str = "PNG") -> bytes:
    """A real photo (skimage.data), resized to `image_size(row_id)` and encoded."""
    img = Image.fromarray(_photo(PHOTOS[row_id % len(PHOTOS)])).resize(image_size(row_id))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def seed_table(row_ids: list[int], *, corrupt: frozenset[int] = frozenset(),
               hints: dict[int, str] | None = None) -> pa.Table:
    """Rows in the seed schema plus a `caption` alt-text column; rows in `corrupt` hold undecodable bytes."""
    hints = hints or {}
    images = [CORRUPT if r in corrupt else photo_bytes(r) for r in row_ids]
    sizes = [image_size(r) for r in row_ids]
    return pa.table({
        "image": pa.array(images, pa.binary()),
        "recaption": pa.array([f"old caption {r}" for r in row_ids], pa.string()),
        "recaption_short": pa.array([None] * len(row_ids), pa.string()),
        "height": pa.array([h for _, h in sizes], pa.int64()),
        "width": pa.array([w for w, _ in sizes], pa.int64()),
        "aspect_ratio": pa.array([w / h for w, h in sizes], pa.float64()),
        "bucket_size": pa.array([f"{w // 16 * 16}x{h // 16 * 16}" for w, h in sizes], pa.string()),
        "class": pa.array([r % 3 for r in row_ids], pa.int64()),
        "id": pa.array([f"img{r:05d}" for r in row_ids], pa.string()),
        "caption": pa.array([hints.get(r, f"row {r} alt text") for r in row_ids], pa.string()),
    })


def write_shards(folder: Path, n_shards: int, rows_per_shard: int, *, corrupt: frozenset[int] = frozenset(),
                 hints: dict[int, str] | None = None, row_group_size: int = 1000) -> list[Path]:
    """Shards `part-00000.parquet`, ...; global row ids run on across shards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        ids = list(range(s * rows_per_shard, (s + 1) * rows_per_shard))
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(seed_table(ids, corrupt=corrupt, hints=hints), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Fake captioners: deterministic, same interface as the HF ones
# --------------------------------------------------------------------------------------------------

_ALT = re.compile(r'alt-text[^"]*"([^"]*)"')


class FakeDescriber:
    """Names the image's size and echoes the alt-text hint, so a caption shows which row it came from.

    Hints steer failures: 'EMPTY' -> '', 'REFUSE' -> a refusal, 'TERSE' -> two words, 'BREAK' -> the whole
    batch raises (like a processor rejecting one image), 'STOP' -> KeyboardInterrupt (a kill)."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def describe(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        hints = [m.group(1) if (m := _ALT.search(p)) else "" for p in prompts]
        self.batches.append(hints)
        if any("STOP" in h for h in hints):
            raise KeyboardInterrupt
        if any("BREAK" in h for h in hints):
            raise ValueError("the processor cannot take this image")
        out = []
        for img, hint in zip(images, hints):
            assert img.mode == "RGB"
            if "EMPTY" in hint:
                out.append("   ")
            elif "REFUSE" in hint:
                out.append("I\u2019m sorry, but I cannot describe this image in any useful detail at all.")
            elif "TERSE" in hint:
                out.append("A cat.")
            else:
                w, h = img.size
                out.append(f"Sure, here is a description: a photo of {w} by {h} pixels showing {hint} "
                           "with soft light and a quiet background.")
        return out

    @property
    def rows_seen(self) -> int:
        return sum(len(b) for b in self.batches)


class FakeShortener:
    """Returns 'Short: <the description's words up to 'showing' and the hint>' with a chat preamble.

    A description containing 'LONG' gets a 60-word reply (over the 40-word limit)."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def shorten(self, prompts: list[str]) -> list[str]:
        captions = [p.split("Description: ", 1)[1] for p in prompts]
        self.batches.append(captions)
        out = []
        for c in captions:
            if "LONG" in c:
                out.append(" ".join(["word"] * 60))
            else:
                out.append('Here is the sentence:\n\n"' + c.split(" with soft light")[0] + '."')
        return out


# --------------------------------------------------------------------------------------------------
# Tiny real models
# --------------------------------------------------------------------------------------------------

VOCABULARY = (
    "a an the of on in with and near next to photo picture image cat dog man woman child sitting standing "
    "red blue green white black brown small large old young street sign reads open letters tree sky house "
    "car window sofa table cup coffee rocket launch astronaut suit flag building wall grass field water "
    "beach mountain light dark bright soft background foreground close up view user assistant :"
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} : "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant : {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<image>"])
    tok.train_from_iterator([VOCABULARY], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def make_tiny_vlm(folder: Path, seed: int = 0) -> Path:
    """A random LLaVA (CLIP ViT 32 px / patch 8 + 2-layer Llama) with its processor, saved to `folder`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = make_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,  # (32 / 8)^2 patches; the 'default' strategy drops the CLS feature
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_llm(folder: Path, seed: int = 1) -> Path:
    """A random 2-layer Llama causal LM with a chat template, saved to `folder`."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(_llama_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
