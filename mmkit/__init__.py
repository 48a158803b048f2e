"""mmkit: efficient multimodal and language model methods from one command line."""

__version__ = "0.1.0"
