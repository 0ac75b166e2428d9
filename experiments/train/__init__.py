"""Training: the epoch loop and evaluation (``engine``), a whole fit with resume (``fit``), checkpoints and RNG
state (``checkpoints``), preemption handling (``preemption``) and DDP (``distributed``)."""
