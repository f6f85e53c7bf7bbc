"""ctirf_live.inference."""
