"""MLflow side of sntrack: the sync consumer, its REST client, and reconciliation."""
