"""Stage 4: metrics, LM splicing and feature reports (issue 5)."""
