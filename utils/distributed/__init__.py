"""The process group and what runs on it: rendezvous, the watchdog, DDP/FSDP wrapping."""
