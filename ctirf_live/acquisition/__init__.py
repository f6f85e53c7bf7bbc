"""ctirf_live.acquisition."""
