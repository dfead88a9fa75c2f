"""`make bench`: every figure beside a baseline measured in the same run (see bench/__main__.py)."""
