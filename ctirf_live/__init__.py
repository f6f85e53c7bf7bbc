"""ctirf-live: computational TIRF (cTIRF) inside the microscope's acquisition loop."""

__version__ = "0.1.0"
