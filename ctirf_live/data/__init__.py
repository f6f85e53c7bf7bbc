"""ctirf_live.data."""
