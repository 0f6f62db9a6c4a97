"""Benchmarks: side-by-side speed and quality of eager diffusers, DeepCache, torch.compile and fastcache."""
