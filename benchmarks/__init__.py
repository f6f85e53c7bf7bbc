"""Speed and quality benchmarks; each records its command and figures in RESULTS.md."""
