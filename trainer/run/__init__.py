"""The training entry (TRL's SFTTrainer), its callbacks, signals, launcher, memory and system stats."""
