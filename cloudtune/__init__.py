"""cloudtune: fine-tune an LLM on the cheapest rented GPU that fits, for a price known up front."""

__version__ = "0.1.0"
