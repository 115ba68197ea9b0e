"""Checkpoints: one directory per saved step, written whole or not at all, verifiable on reload.

    <run_dir>/checkpoints/step_00001000/
        model.safetensors   the trained weights (fp32)
        ema.safetensors     the EMA weights (fp32): what inference uses
        config.json         the full resolved config: inference needs nothing else
        train_state.pt      optimizer state, step, run ids (plain tensors and numbers:
                            loads with torch.load(weights_only=True))
        manifest.json       written last: every other file's size and CRC-32

A run under fsdp/hsdp writes the same step_* directory in shards, every model rank its own part in
parallel (torch.distributed.checkpoint with its safetensors storage: tensors and their offsets, no pickle):

    <run_dir>/checkpoints/step_00001000/
        model/shard-0000N-model-00001-of-00001.safetensors   one per model rank
        ema/...  optimizer/...                               the same; the optimizer state keyed by name
        config.json, train_state.pt, manifest.json          as above (the manifest lists every shard)

Either layout resumes either mode (a sharded run on any number of ranks) and loads for inference.

`read` finds, verifies and loads them (the trainer on resume, the inference pipeline, the evaluation);
`write` saves them (the trainer only). Both sit below the layers that use them.
"""
