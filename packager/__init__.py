"""Turns submission specs into NeurIPS 2023 LLM Efficiency Challenge entries."""

__version__ = "0.1.0"
