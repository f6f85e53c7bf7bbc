"""ctirf_live.gui."""
