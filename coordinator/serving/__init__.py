"""What both fronts share: the drain, shutdown on signals, transport security and metrics."""
