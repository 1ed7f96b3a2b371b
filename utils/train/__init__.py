"""The training run: its command line, the wiring, the loop, optimizers, validation, stopping."""
