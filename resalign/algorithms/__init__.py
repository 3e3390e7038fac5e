"""ResAlign's algorithms: hypergradients, simulated fine-tuning, objectives, methods."""
