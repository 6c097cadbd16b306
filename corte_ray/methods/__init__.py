"""The algorithms of METHODS.md as pure PyTorch: pseudo-labels, refinement, views, mixing, losses and the
per-method training steps. No Ray and no file I/O here (DESIGN.md), so every piece runs in a plain loop, on one
GPU and under Ray Train alike."""
