"""The GPT model: embeddings, attention, MLP, blocks and the norm placement registry."""

from model.gpt import GPT, build_model

__all__ = ["GPT", "build_model"]
