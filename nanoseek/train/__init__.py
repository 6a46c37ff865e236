"""Pretraining and SFT: the loop, AdamW and its schedules, atomic checkpoints with exact resume."""
