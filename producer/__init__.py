"""The training side: event emission, the confirming/spooling publisher, and the Optuna worker."""
