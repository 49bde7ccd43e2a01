"""The model: one typed Checkpoint found and cached once (checkpoint, ct2, convert), Whisper's network in
plain PyTorch with its key/value cache, its int8 form (int8), and how a process holding it runs (runtime, resources)."""
