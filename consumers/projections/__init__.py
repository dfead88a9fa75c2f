"""The SQL projections (read models) the runtime applies exactly once; `base` defines what a projection is."""
