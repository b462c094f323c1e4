"""On-the-fly active learning: simulate, find where the model is unsure, label, retrain, simulate further."""
