"""ctirf_live.optics."""
