"""Checkpoints: the file format, the run's checkpoint folder, sharded (DCP) folders."""
