"""kosmo: train, align and serve multimodal language models, from a laptop CPU to GPU clusters."""

__version__ = "0.1.0"
