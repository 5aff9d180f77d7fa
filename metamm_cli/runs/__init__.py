"""The run folder: its layout (layout.py), the claim that one process holds it, what it records,
its checkpoints, the state a checkpoint restores, resuming, and stopping on a signal; reader.py
reads a folder back (metamm compare)."""
