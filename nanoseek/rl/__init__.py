"""R1 reasoning: verifiable rewards, evaluation on held-out problems."""
