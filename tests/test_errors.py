"""One-line errors that name the problem (issue 12, item 10)."""

from pathlib import Path

import pytest
import safetensors.torch
import torch
import useq
from pydantic import ValidationError
from typer.testing import CliRunner

from ctirf_live.cli import app, error_line
from ctirf_live.config import Optics, validation_message
from ctirf_live.models.checkpoint import CheckpointError, read_metadata, save_checkpoint
from ctirf_live.models.etnet import ET2dNet, load_model, save_model

runner = CliRunner()


def _validation_error(model: type, data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return info.value


def test_optics_errors_name_every_field() -> None:
    msg = validation_message(_validation_error(Optics, {"na": -1, "pixel_size_um": 0}))
    assert msg == (
        "invalid Optics: na: Input should be greater than 0; "
        "pixel_size_um: Input should be greater than 0"
    )


def test_sequence_union_errors_name_the_field_not_the_plan_classes() -> None:
    err = _validation_error(
        useq.MDASequence, {"time_plan": {"interval": "abc", "loops": 3}, "z_plan": {"range": 4}}
    )
    assert err.error_count() > 5  # pydantic reports every member of the unions
    msg = validation_message(err)
    assert msg.startswith("invalid MDASequence: time_plan.interval: Input should be a valid")
    assert "z_plan.step: Field required" in msg
    assert "TIntervalLoops" not in msg and "ZRangeAround" not in msg
    assert "\n" not in msg


def test_long_reports_are_cut_to_three_fields() -> None:
    bad = {"na": -1, "pixel_size_um": 0, "z_step_um": 0, "immersion_index": 9}
    msg = validation_message(_validation_error(Optics, bad))
    assert msg.endswith("; and 1 more") and msg.count(": Input") == 3


def test_cli_error_line_names_fields_and_the_cli_option() -> None:
    assert error_line(_validation_error(Optics, {"na": "high"})).startswith("invalid Optics: na:")
    zarr = FileExistsError("There is already data in 'x.zarr'. Use 'overwrite=True' to overwrite.")
    assert error_line(zarr) == "There is already data in 'x.zarr'. pass --overwrite to replace it"
    assert "--overwrite" in error_line(ValueError("exists; set overwrite=True"))


def _checkpoint_with(tmp_path: Path, **changes: object) -> Path:
    torch.manual_seed(0)
    path = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "net")
    state = safetensors.torch.load_file(path)
    meta = read_metadata(path)
    arch = meta["architecture"]
    arch["kwargs"].update(changes.pop("kwargs", {}))
    meta.update(changes)
    return save_checkpoint(tmp_path / "edited", state, meta)


def test_unknown_architecture_argument_is_one_line(tmp_path: Path) -> None:
    path = _checkpoint_with(tmp_path, kwargs={"window": 7, "heads2": 3})
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "heads2, window" in msg and "upgrade ctirf-live" in msg and str(path) in msg


def test_bad_architecture_value_and_optics_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot be rebuilt: .*S9"):
        load_model(_checkpoint_with(tmp_path, kwargs={"variant": "S9"}))
    bad_optics = {**Optics().model_dump(), "na": 0}
    with pytest.raises(CheckpointError, match=r"optics are invalid Optics: na: Input should be"):
        load_model(_checkpoint_with(tmp_path, optics=bad_optics))


def test_process_with_such_a_checkpoint_exits_2_without_traceback(tmp_path: Path) -> None:
    path = _checkpoint_with(tmp_path, kwargs={"window": 7})
    src = tmp_path / "in.tif"
    src.write_bytes(b"")
    result = runner.invoke(app, ["process", str(src), "-m", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "window" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
