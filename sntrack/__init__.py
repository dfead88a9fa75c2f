"""sntrack: the shared settings, logging and the command line that joins producer and consumers."""

__version__ = "0.1.0"
