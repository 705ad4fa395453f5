"""Network code no library ships (MAR), with parameter names that load the official checkpoints."""
