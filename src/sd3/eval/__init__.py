"""Image-quality scores (Inception features, FID, KID, CLIP score), used offline by `src/evaluate.py` and
online by the trainer."""
