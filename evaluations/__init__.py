"""FID, sFID, Inception Score, precision/recall and KID of sample batches (torch-fidelity)."""
