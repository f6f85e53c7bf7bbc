"""ET3dNet distillation from a frozen ET2dNet teacher: targets, training, checkpoints, CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.data.normalize import percentile_scale
from ctirf_live.data.stacks import Stack, StackSet
from ctirf_live.data.tiff import write_ome_tiff
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet, load_model, save_model
from ctirf_live.sim.scope import DEFAULT_OBJECTIVES
from ctirf_live.training.distill import distill, distill_settings, teacher_targets
from ctirf_live.training.trainer import TrainError, TrainResult

runner = CliRunner()
OPTICS = DEFAULT_OBJECTIVES["60X"]


def _stacks(n: int, planes: int = 6, side: int = 64, seed: int = 0) -> StackSet:
    """Random stacks with a bright in-focus structure in one plane over a haze."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        stack = 200 + rng.normal(0, 5, (planes, side, side)).astype(np.float32)
        stack[planes // 2, side // 4 : side // 2, side // 3] += 2000.0
        out.append(Stack(stack, f"toy:{i}"))
    return StackSet(out, OPTICS, 0.2, "toy stacks")


@pytest.fixture(scope="module")
def teacher() -> ET2dNet:
    torch.manual_seed(0)
    return ET2dNet(OPTICS, "tiny").eval()


def test_teacher_targets_share_the_stacks_normalisation(teacher: ET2dNet) -> None:
    stack = _stacks(1).stacks[0].epi
    target = teacher_targets(teacher, stack)
    assert target.shape == stack.shape and target.dtype == np.float32
    scale = percentile_scale(stack)
    with torch.no_grad():
        plane = torch.from_numpy(np.clip(stack[2] / scale, 0, 1))[None, None]
        expected = teacher(plane).g[0, 0].numpy() * scale
    np.testing.assert_allclose(target[2], expected, rtol=1e-4, atol=1e-3)


def test_distillation_loss_falls_and_checkpoints_record_the_stack(
    teacher: ET2dNet, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    settings = distill_settings(epochs=4, crop=64, warmup_epochs=0, lr=2e-3)

    def run() -> TrainResult:
        return distill(
            teacher, _stacks(2), _stacks(1, seed=1), settings, tmp_path / "run",
            variant="tiny", device="cpu", progress=False, samples_per_epoch=8,
        )  # fmt: skip

    result = run()
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.95 * losses[0]
    model, meta = load_model(result.best_path)
    assert model.dims == 3 and model.name == "ET3dNet"
    assert meta["stack"] == {"planes": 6, "z_step_um": 0.2} and meta["planes"] == 6
    assert meta["provenance"]["kind"] == "distill"
    again = run()
    assert len(again.history) == 4  # resumed: nothing left to do


def test_a_3d_model_refuses_other_stacks_and_slides_over_longer_ones(tmp_path: Path) -> None:
    from ctirf_live.models.etnet import ET3dNet

    torch.manual_seed(0)
    path = save_model(ET3dNet(OPTICS, "tiny"), tmp_path / "m3d.safetensors")
    restorer = Restorer(path, device="cpu")
    with pytest.raises(ValueError, match="4 planes but ET3dNet was trained on 6"):
        restorer.restore(np.ones((4, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"z step is 500 nm .* trained on 200 nm"):
        restorer.check_stack(6, 0.5)
    rng = np.random.default_rng(0)
    long = rng.random((41, 64, 64)).astype(np.float32)
    out = restorer.restore(long)
    assert out.shape == long.shape and np.isfinite(out).all()
    # the first window alone gives the first planes (up to the blend of the next window)
    first = restorer.restore(long[:6])
    assert np.corrcoef(out[0].ravel(), first[0].ravel())[0, 1] > 0.9


def test_cli_distills_from_stack_files(teacher: ET2dNet, tmp_path: Path) -> None:
    folder = tmp_path / "stacks"
    folder.mkdir()
    for i, s in enumerate(_stacks(3).stacks):
        write_ome_tiff(
            folder / f"s{i}.ome.tif",
            s.epi[None],
            "CZYX",
            pixel_size_um=OPTICS.pixel_size_um,
            z_step_um=0.2,
            channel_names=["EPI"],
        )
    ckpt = save_model(teacher, tmp_path / "teacher.safetensors")
    args = ["distill", "--teacher", str(ckpt), "--stacks", str(folder), "--variant", "tiny"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--crop", "64", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "best.safetensors").is_file()
    inflated = runner.invoke(
        app,
        [*args, "--inflate", "--lr", "1e-4", "--epochs", "1", "--crop", "64", "-o",
         str(tmp_path / "i")],
    )  # fmt: skip
    assert inflated.exit_code == 0, inflated.output
    _, meta = load_model(tmp_path / "i" / "best.safetensors")
    assert meta["provenance"]["settings"]["lr"] == 1e-4
    assert meta["provenance"]["settings"]["loss"]["axial_coarse"] > 0  # the default prior
    bad = runner.invoke(app, ["distill", "--teacher", str(ckpt), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "exactly one of --stacks" in bad.output


def test_stack_files_without_optics_take_the_teachers_rig(tmp_path: Path) -> None:
    from ctirf_live.data.stacks import stacks_from_files

    path = tmp_path / "s.ome.tif"
    write_ome_tiff(path, _stacks(1).stacks[0].epi, "ZYX", pixel_size_um=0.11, z_step_um=0.3)
    found = stacks_from_files([path], planes=6)
    assert not found.optics_recorded
    other = DEFAULT_OBJECTIVES["100X"]
    merged = found.with_optics(other)
    assert merged.optics.na == other.na and merged.optics.pixel_size_um == pytest.approx(0.11)
    assert merged.optics.z_step_um == pytest.approx(0.3) and merged.optics_recorded


def test_the_student_starts_with_a_reconstruction_near_the_stack() -> None:
    from ctirf_live.models.etnet import ET3dNet
    from ctirf_live.training.distill import START_G, start_near_the_stack

    torch.manual_seed(0)
    student = ET3dNet(OPTICS.model_copy(update={"z_step_um": 0.2}), "tiny")
    stack = torch.full((1, 1, 6, 64, 64), 0.5)
    default = float(student(stack).recon.mean())
    start_near_the_stack(student)
    out = student(stack)
    assert float(out.g.mean()) == pytest.approx(START_G, rel=0.1)
    assert 0.25 < float(out.recon.mean()) < 1.0 < default  # softplus(0) starts ~5x too bright


def test_a_student_continues_an_et3dnet_and_refuses_a_2d_one(
    teacher: ET2dNet, tmp_path: Path
) -> None:
    """--init-student starts from the checkpoint's weights (not the near-the-stack start),
    records the missing-cone prior in its settings, and names a wrong network in one line."""
    torch.manual_seed(0)
    settings = distill_settings(epochs=1, crop=64, warmup_epochs=0, lr=1e-9)
    first = distill(
        teacher, _stacks(2), None, settings, tmp_path / "a",
        variant="tiny", device="cpu", progress=False, samples_per_epoch=2,
    )  # fmt: skip
    start, _ = load_model(first.best_path)
    prior = settings.model_copy(
        update={"loss": settings.loss.model_copy(update={"axial_coarse": 50.0})}
    )
    again = distill(
        teacher, _stacks(2), None, prior, tmp_path / "b", variant="tiny", device="cpu",
        progress=False, samples_per_epoch=2, init_student=first.best_path,
    )  # fmt: skip
    cont, meta = load_model(again.best_path)
    pairs = zip(start.named_parameters(), cont.parameters(), strict=True)
    for (k, a), b in pairs:  # lr ~0: the weights are the checkpoint's (BN statistics move)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)
    assert meta["provenance"]["settings"]["loss"]["axial_coarse"] == 50.0
    assert again.history[0]["train_axial_coarse"] >= 0.0  # the prior was in the loss
    with pytest.raises(TrainError, match="2D model"):
        distill(
            teacher, _stacks(2), None, settings, tmp_path / "c", variant="tiny",
            device="cpu", progress=False, init_student=save_model(teacher, tmp_path / "t"),
        )  # fmt: skip


def test_an_inflated_student_starts_as_its_teacher_run_plane_by_plane(teacher: ET2dNet) -> None:
    """--inflate: the 3D student's g follows the teacher's per-plane g (scaled by the Z
    profile's sum, since g must not count the neighbours' light again); a teacher of
    another size is refused in one line."""
    from ctirf_live.models.etnet import ET3dNet
    from ctirf_live.training.distill import inflate_teacher

    torch.manual_seed(0)
    student = ET3dNet(OPTICS, "tiny").eval()
    inflate_teacher(student, teacher)
    stack = torch.rand(1, 1, 6, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        g3 = student(stack).g[0, 0]
        g2 = torch.stack([teacher(p[None, None]).g[0, 0] for p in stack[0, 0]])
    corr = float(torch.corrcoef(torch.stack([g3.flatten(), g2.flatten()]))[0, 1])
    assert corr > 0.95
    assert 0.2 < float(g3.mean() / g2.mean()) < 0.8  # ~1 / sum of the Z profile
    with pytest.raises(TrainError, match="backbone differs"):
        inflate_teacher(ET3dNet(OPTICS, "S0"), teacher)
