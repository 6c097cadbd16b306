"""Training: the engine-neutral loop (loop.py), its local context (context.py) and the Ray Train engine
(ray_engine.py, the only module here that imports Ray)."""
