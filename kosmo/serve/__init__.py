"""Serving: the continuous-batching engine, the OpenAI-compatible API with its playground page, safe
image loading for requests, and the terminal chat."""
