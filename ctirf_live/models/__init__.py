"""ctirf_live.models."""
