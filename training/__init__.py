"""Recipes that make checkpoints: data collection, tokenizer, dynamics model, success detector."""
