"""Stage 3: dictionaries, objectives and the trainer (issue 4)."""
