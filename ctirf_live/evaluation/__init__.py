"""ctirf_live.evaluation."""
