"""ctirf_live.sim."""
