"""fmsearch: how good can a small CNN get on Fashion-MNIST, and how much survives with fewer labels?"""

__version__ = "0.1.0"
