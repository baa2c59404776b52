"""Decoder-only transformer models (Llama 2/3, Mistral, Qwen2, Qwen3) sharing one implementation."""

from engine.models.decoder import DecoderModel

__all__ = ["DecoderModel"]
