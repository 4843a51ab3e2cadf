"""Evaluation failures that are not bad input (exit status 1, like non-finite activations in a harvest)."""
from __future__ import annotations

from ..errors import MatryoshkaError


class NonFiniteMetrics(MatryoshkaError, RuntimeError):
    """A run's LM metrics came out NaN or infinite: its eval.json records them as null (valid JSON), and the
    command fails with this one line naming the runs and the metrics."""

    exit_code = 1
