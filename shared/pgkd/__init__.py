"""PGKD: Performance-Guided Knowledge Distillation of an LLM text classifier into a small student."""
__version__ = "0.1.0"
