"""Training the embedded default checkpoint with the residual Log-OP local-learning objective."""
