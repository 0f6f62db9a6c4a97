"""``python -m fastcache serve``: an OpenAI-compatible image server around a fastcache pipeline.

Modules, one job each: `config` (ServeConfig, one field per CLI flag), `protocol` (request and
response models, the OpenAI-style error helper), `batcher` (the queue that forms batches),
`accelerators` (fastcache, DeepCache or plain diffusers), `engine` (pipeline + worker thread),
`metrics` (Prometheus), `middleware` and `app` (FastAPI), `cli` (uvicorn), `ray_serve` (replicas).
Importing this package imports none of the web libraries; ``pip install 'fastcache-diffusers[serve]'``
provides them.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
