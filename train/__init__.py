"""The program: data, evaluation, checkpoints, the train/meta.py entry point."""
