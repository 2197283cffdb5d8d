"""crystal-lm: reproduce and extend LLM360's Crystal multi-stage language + code pretraining."""

__version__ = "0.1.0"
