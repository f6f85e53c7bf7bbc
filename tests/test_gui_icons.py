"""Icon lookups: one failed network attempt at most, then local stand-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("superqt")

from ctirf_live.gui import icons


@pytest.fixture
def fresh(monkeypatch):
    """The module's state as at import, restored afterwards."""
    monkeypatch.setattr(icons, "_state", {"offline": False, "folder": None, "original": None})
    monkeypatch.delenv(icons.OFFLINE_ENV_VAR, raising=False)
    return icons


def test_stand_ins_keep_direction_and_count() -> None:
    up = icons.stand_in_svg(("mdi:chevron-triple-up",), "lime")
    assert up.count("<polyline") == 3 and "6,15 12,9 18,15" in up and 'stroke="lime"' in up
    left = icons.stand_in_svg(("mdi", "chevron-left"))
    assert left.count("<polyline") == 1 and "15,6 9,12 15,18" in left
    assert "<circle" in icons.stand_in_svg(("bi:sign-stop-fill",), "red")


def test_network_is_tried_once_then_stand_ins(fresh, tmp_path) -> None:
    calls: list[tuple] = []

    def unreachable(*key, **kwargs) -> Path:
        calls.append(key)
        raise OSError("Failed to resolve 'api.iconify.design'")

    fresh._state["original"] = unreachable
    first = fresh.icon_path("mdi:chevron-up", color="green")
    second = fresh.icon_path("mdi:camera", color="green")
    assert calls == [("mdi:chevron-up",)] and fresh.is_offline()  # no second attempt
    assert first.read_text().startswith("<svg") and first != second
    assert fresh.icon_path("mdi:chevron-up", color="green") == first  # written once


def test_cached_icons_are_used_while_online(fresh, tmp_path) -> None:
    cached = tmp_path / "camera.svg"
    cached.write_text("<svg/>")
    fresh._state["original"] = lambda *key, **kwargs: cached
    assert fresh.icon_path("mdi:camera") == cached and not fresh.is_offline()
    fresh.set_offline(True)  # by request (tests, air-gapped rigs): never asked
    assert fresh.icon_path("mdi:camera") != cached


def test_install_routes_superqt_and_the_stage_widget(fresh, monkeypatch) -> None:
    import superqt.iconify as iconify

    pytest.importorskip("pymmcore_widgets")
    import pymmcore_widgets.control._stage_widget as stage_module

    monkeypatch.setattr(iconify, "svg_path", iconify.svg_path)
    monkeypatch.setattr(stage_module, "svg_path", stage_module.svg_path)
    original = iconify.svg_path
    fresh.install()
    fresh.install()  # once only
    assert iconify.svg_path is fresh.icon_path and stage_module.svg_path is fresh.icon_path
    assert fresh._state["original"] is original
