"""Every random stream of a run, by name.

Every draw is a pure function of the run's seed and of where it happens, never of a generator's state:
`sd3.flow.step_generator(seed, step, rank, salt=...)` for torch draws, `sd3.data.sampler.generator(seed,
salt, ...)` for numpy ones. A distinct salt per stream keeps streams independent (a change to how many
numbers one of them draws never shifts another), and a resumed run redraws exactly what the straight run
drew. The training draws of a model rank (t and the noise) use the unsalted stream (seed, step, rank).
"""

# Data order (sd3.data.sampler): the permutation of each bucket per epoch, then the order of batches.
DATA_PERMUTE = 0x5EED_0001
DATA_ORDER = 0x5EED_0002
# Rows and captions (sd3.data.dataset)
CAPTION_CHOICE = 0x5EED_0101
"""Per sample: the short or the long caption."""
ROW_REPLACE = 0x5EED_0102
"""The row that replaces one that does not decode."""
HOLDOUT_ROWS = 0x5EED_0103
"""Which rows are held out for validation."""
HOLDOUT_CAPTIONS = 0x5EED_0104
ROW_CAPTION = 0x5EED_0105
"""The caption of a row evaluated outside the held-out set (sd3.evaluation, `--split all`)."""
EVAL_ROWS = 0x5EED_0E01
"""The rows src/evaluate.py draws (with its --seed)."""
# Conditioning and latents
CAPTION_DROPOUT = 0xD409
"""Per sample: which text streams and the pooled vector are nulled (the loader draws the same)."""
PATCH_MASK = 0x3A5C
"""Per sample: which image tokens the main blocks keep under patch masking (`model.mask_ratio`)."""
POSTERIOR = 0x7A0
"""The autoencoder's posterior sample of each training image (per loader)."""
HOLDOUT_POSTERIOR = 0x7A1
"""The posterior samples of the held-out rows."""
