"""benchmarks/bench_gpu.py runs end to end on the CPU (`--quick`, tiny networks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_gpu


@pytest.mark.slow
def test_quick_run_on_cpu_writes_its_rows_and_keeps_other_devices(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    gpu_row = "| NVIDIA H200 | ET2dNet S0 frames/s at 2048x2048 | 180.0 | >= 100 | yes |"
    results.write_text(
        f"# Benchmark results\n\n## {bench_gpu.SECTION}\n\n{bench_gpu.HEADER}\n|---|\n"
        f"{gpu_row}\n| CPU (old) | stale | 1 | - | n/a |\n\n## Other\n\nkept\n"
    )
    rows = bench_gpu.main(["--quick", "--tiny", "--device", "cpu", "--results", str(results)])
    assert len(rows) == 4 and all(r.startswith("| CPU (") for r in rows)
    text = results.read_text()
    assert gpu_row in text and "## Other\n\nkept" in text
    for row in rows:
        assert row in text
    assert "frames/s at 256x256" in text and "stacks/s at 6x128x128" in text


def test_rows_of_other_devices_are_kept() -> None:
    section = f"{bench_gpu.HEADER}\n|---|\n| A | x | 1 | - | n/a |\n| B | y | 2 | - | n/a |\n"
    assert bench_gpu.merge_rows(section, "A", ["| A | new |"]) == [
        "| B | y | 2 | - | n/a |",
        "| A | new |",
    ]
