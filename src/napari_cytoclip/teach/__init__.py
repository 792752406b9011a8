"""Learning from corrections: pairs, export, training, evaluation and the live learner."""
