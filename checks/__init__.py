"""mlx-verify's verification engine: does an mlx-lm port compute what transformers computes?"""

__version__ = "0.1.0"
