"""Stage 2: the DeFrag model, its objective, the trainer, evaluation, retrieval and explanation."""
