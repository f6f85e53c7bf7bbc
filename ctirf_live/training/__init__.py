"""ctirf_live.training."""
