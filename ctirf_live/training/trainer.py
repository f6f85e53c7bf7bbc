"""Training and fine-tuning of ET2dNet (paper Methods 4.5).

Recipe: AdamW (lr 5e-4), a per-step schedule that warms up linearly over
`warmup_epochs` and then follows a cosine to ~0 at `epochs` (the warm-up is capped at
`epochs - 1` so short runs still anneal), batch 4, the hybrid loss with the TIRF
variance as per-sample weight, the best checkpoint chosen by validation loss (by
training loss when there is no validation set).

The run folder `out` holds:

- `best.safetensors` (+ `.json` sidecar): the best model so far, a normal checkpoint;
- `last.safetensors`: the model after the last finished epoch;
- `resume.state` (a safetensors file, named so checkpoint listings skip it): model
  weights, optimizer moments and, in its JSON header, the epoch, history, scaler state
  and a fingerprint of the run. One file written atomically, so it always describes one
  finished epoch; it never holds pickles;
- `metrics.jsonl`: one JSON line per epoch (train loss terms, val loss, val MS-SSIM,
  lr, seconds); `steps.jsonl` every `log_every` steps when asked.

Resuming (`resume=True`, the default) continues after the last finished epoch with the
same history. No RNG state is stored: every epoch reseeds torch and draws its crops from
(seed, epoch), so a resumed run repeats the uninterrupted one. After Ctrl-C the files
of the last finished epoch stay valid and their paths are printed.

On CUDA the forward pass runs under `torch.autocast` (bfloat16 where supported, else
float16 with a GradScaler); only the backbone computes in half precision, because the
softplus heads are on autocast's float32 list and the PSF convolution computes in
float32, and the loss casts its inputs to float32 itself.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Subset

from ctirf_live.atomic import atomic_write
from ctirf_live.config import Optics, TrainSettings
from ctirf_live.data.loaders import CropDataset, PairSource, split_by_field
from ctirf_live.models.checkpoint import CheckpointError, check_state_dict, load_checkpoint
from ctirf_live.models.device import select_device
from ctirf_live.models.etnet import ETNet, load_model, save_model
from ctirf_live.training import distributed
from ctirf_live.training.losses import HybridLoss, structural_similarity

BEST = "best.safetensors"
LAST = "last.safetensors"
RESUME = "resume.state"
FINISHED = "finished.json"  # what is left of the resume state once a run completes
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
RESUME_KEY = "ctirf_resume"

FINETUNE_EPOCHS = 20
FINETUNE_WARMUP_EPOCHS = 2
FINETUNE_LR = 2e-4
"""Fine-tuning defaults: the paper reports that ~20 pairs converge within 20 epochs with
the hybrid model (Fig. 2c,d); starting from trained weights, a 2-epoch warm-up and a
peak lr below the from-scratch 5e-4 avoid wrecking the pre-trained features."""

_PSF_FIELDS = (
    "objective",
    "na",
    "emission_wavelength_nm",
    "immersion_index",
    "sample_index",
    "pixel_size_um",
)

console = Console(stderr=True, soft_wrap=True)


class TrainError(ValueError):
    """A training run that cannot start as asked; the message says what to do."""


@dataclass
class TrainResult:
    """Where the run's checkpoints are and how it went (one dict per epoch in history)."""

    best_path: Path
    best_val_loss: float
    history: list[dict[str, Any]]
    last_path: Path
    notes: list[str] = field(default_factory=list)  # each shown on the console when it arose
    consistency: dict[str, Any] = field(default_factory=dict)  # the monitor's calibration


CALIBRATION_FRAMES = 64


def _calibration_frames(
    val_source: PairSource | None, train_source: PairSource, wanted: int
) -> tuple[list[np.ndarray], str]:
    """Up to `wanted` EPI frames to calibrate the monitor on: the validation frames, their
    four quadrants (frames of >= 256 px), then training frames and their quadrants (which
    the model fits more closely, so they make the monitor stricter). A few-shot run has
    two or three validation frames: on 16 frames the demo's fine-tuned model flagged 2 of
    6 held-out frames of its own rig, on 64 (with the training frames' quadrants) 1, the
    one the shipped model flags too. Returns the frames and what they are."""
    frames: list[np.ndarray] = []
    parts: list[str] = []
    val = [p.epi for p in (val_source.pairs if val_source is not None else [])]
    train = [p.epi for p in train_source.pairs]
    for what, group in (("validation", val), ("training", train)):
        for kind, items in ((f"{what} frames", group), (f"{what} quadrants", _split(group))):
            taken = items[: max(wanted - len(frames), 0)]
            if taken:
                frames += taken
                parts.append(f"{len(taken)} {kind}")
    return frames, " + ".join(parts)


def _split(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The quadrants of every frame of >= 256 px (none of smaller ones)."""
    return [q for f in frames if min(f.shape[-2:]) >= 256 for q in _quadrants(f)]


def _quadrants(frame: np.ndarray) -> list[np.ndarray]:
    h, w = frame.shape[-2] // 2, frame.shape[-1] // 2
    return [frame[..., y : y + h, x : x + w] for y in (0, h) for x in (0, w)]


def calibrate_monitor(
    checkpoint: Path, val_source: PairSource | None, train_source: PairSource
) -> dict[str, Any]:
    """Calibrate the consistency monitor on the run's validation frames (see
    `_calibration_frames`) and store it in the best checkpoint; {} when there are too
    few frames, no checkpoint, or on a non-main distributed process."""
    from ctirf_live.inference.consistency import (
        MIN_CALIBRATION_FRAMES,
        calibrate,
        record_calibration,
    )
    from ctirf_live.inference.restorer import Restorer

    frames, what = _calibration_frames(val_source, train_source, CALIBRATION_FRAMES)
    if (
        len(frames) < MIN_CALIBRATION_FRAMES
        or train_source.pairs[0].epi.ndim != 2
        or not Path(checkpoint).is_file()
        or not distributed.is_main_process()
    ):
        return {}
    calibration = calibrate(Restorer(checkpoint, device="cpu"), frames, what)
    record_calibration(checkpoint, calibration)
    return calibration


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Warm-up cosine: linear from base/warmup to base over `warmup_steps`, then cosine
    down to 0 at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def optics_differ(a: Optics, b: Optics) -> bool:
    """Whether two optics give different in-focus PSFs (objective, NA, wavelength, ...)."""
    return any(
        not np.isclose(getattr(a, f), getattr(b, f), rtol=1e-3)
        if isinstance(getattr(a, f), float)
        else getattr(a, f) != getattr(b, f)
        for f in _PSF_FIELDS
    )


def finetune_settings(base: TrainSettings | None = None, **changes: Any) -> TrainSettings:
    """`base` (default TrainSettings) with the fine-tuning schedule, then `changes`."""
    base = base or TrainSettings()
    values = {
        **base.model_dump(exclude_unset=True),
        "epochs": FINETUNE_EPOCHS,
        "warmup_epochs": FINETUNE_WARMUP_EPOCHS,
        "lr": FINETUNE_LR,
        **changes,
    }
    return TrainSettings(**values)


def train(
    model: ETNet,
    train_source: PairSource,
    val_source: PairSource | None,
    settings: TrainSettings,
    out: str | Path,
    *,
    init_from: str | Path | None = None,
    device: str | torch.device = "auto",
    baseline: bool = False,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 0,
    samples_per_epoch: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    keep_resume: bool = False,
) -> TrainResult:
    """Train `model` on `train_source`, select by `val_source`, write the run to `out`.

    `init_from`: a checkpoint whose weights are loaded first (unless resuming), recorded
    in the provenance. `samples_per_epoch`: crops per epoch (default one per training
    frame, at least one batch). `on_step`/`on_epoch` receive each step's and epoch's
    record (for monitoring; they may raise KeyboardInterrupt to stop, as Ctrl-C does).
    Afterwards `model` holds the last epoch's weights; the best are in `best_path`.
    """
    notes: list[str] = []
    if optics_differ(model.optics, train_source.optics):
        notes.append(
            f"warning: the model's optics ({model.optics.describe()}) differ from the data's "
            f"({train_source.optics.describe()}); its PSF will not match: build the model "
            "with the data's optics or use `ctirf finetune`"
        )
        console.print(f"[yellow]{notes[-1]}[/]", highlight=False)
    init = None
    if init_from is not None:
        init = str(init_from)
        state, _ = load_checkpoint(init_from)
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        check_state_dict(model, weights)
    run = _Run(
        model,
        train_source,
        val_source,
        settings,
        Path(out),
        device,
        baseline,
        samples_per_epoch,
        kind="train",
        init_from=init,
        keep_resume=keep_resume,
    )
    result = run.fit(resume, progress, log_every, on_step, on_epoch)
    result.notes[:0] = notes
    result.consistency = calibrate_monitor(result.best_path, val_source, train_source)
    return result


def finetune(
    checkpoint: str | Path,
    source: PairSource,
    settings: TrainSettings | None,
    out: str | Path,
    *,
    device: str | torch.device = "auto",
    baseline: bool = False,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 0,
    samples_per_epoch: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    keep_resume: bool = False,
) -> TrainResult:
    """Fine-tune a checkpoint (path, model folder or shipped name) on `source`.

    `source` is split by field with `settings.val_fraction`. When the data's optics
    differ from the checkpoint's, the model's PSF is rebuilt for the data's optics
    before training (and the run says so). `settings` defaults to `finetune_settings()`.
    """
    settings = settings or finetune_settings()
    path = resolve_model_path(checkpoint)
    model, meta = load_model(path)
    settings = inherit_target_ceiling(settings, meta)
    notes = []
    if optics_differ(model.optics, source.optics):
        notes.append(
            f"PSF switched from the checkpoint's optics ({model.optics.describe()}) to the "
            f"data's ({source.optics.describe()})"
        )
        model.set_optics(source.optics)
        console.print(notes[-1], highlight=False)
    train_source, val_source = split_by_field(source, settings.val_fraction, settings.seed)
    run = _Run(
        model,
        train_source,
        val_source,
        settings,
        Path(out),
        device,
        baseline,
        samples_per_epoch,
        kind="finetune",
        init_from=str(path),
        keep_resume=keep_resume,
    )
    result = run.fit(resume, progress, log_every, on_step, on_epoch)
    result.notes[:0] = notes
    result.consistency = calibrate_monitor(result.best_path, val_source, train_source)
    return result


def inherit_target_ceiling(settings: TrainSettings, metadata: dict[str, Any]) -> TrainSettings:
    """`settings` with the base checkpoint's TIRF target clip unless they name one: a
    fine-tune asks for the same kind of target the model learnt (checkpoints that do not
    record it were trained with Eq. 1's clip at 1)."""
    if "target_ceiling" in settings.model_fields_set:
        return settings
    trained = (metadata.get("provenance") or {}).get("settings") or {}
    ceiling = trained.get("target_ceiling", 1.0)
    return settings.model_copy(update={"target_ceiling": ceiling})


def resolve_model_path(name_or_path: str | Path) -> str | Path:
    """A run folder means its best checkpoint; anything else goes to `load_model` as is."""
    path = Path(name_or_path)
    if path.is_dir():
        best = path / BEST
        if not best.is_file():
            raise CheckpointError(f"{path} has no {BEST}; pass a .safetensors file or model name")
        return best
    return name_or_path


def evaluate_model(
    model: ETNet,
    source: PairSource,
    percentile: float = 98.0,
    device: str | torch.device = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """MS-SSIM and PSNR (mean, sd over pairs) of cTIRF and of raw EPI against TIRF.

    Whole frames; EPI is percentile-normalised as at inference. The reference is the
    noise-free ground truth when every pair has one (simulated data), else the measured
    TIRF. Scores use `ctirf_live.evaluation.metrics` (each image normalised on its own).
    `progress(done, total)` is called after each pair.
    """
    from ctirf_live.data.normalize import normalize
    from ctirf_live.evaluation.metrics import ms_ssim, psnr

    if len(source) == 0:
        raise TrainError(f"{source.description}: no pairs to evaluate")
    dev = select_device(device)
    model = model.to(dev).eval()
    use_truth = source.has_truth
    scores: dict[str, dict[str, list[float]]] = {
        "ctirf": {"ms_ssim": [], "psnr": []},
        "epi": {"ms_ssim": [], "psnr": []},
    }
    with torch.inference_mode():
        for i, pair in enumerate(source.pairs):
            reference = pair.truth if use_truth and pair.truth is not None else pair.tirf
            epi, _ = normalize(pair.epi, percentile, ceiling=model.input_ceiling)
            x = torch.from_numpy(epi)[None, None].to(dev)
            with _autocast(dev):
                ctirf = model(x).ctirf.float()[0, 0].cpu().numpy()
            for name, image in (("ctirf", ctirf), ("epi", pair.epi)):
                scores[name]["ms_ssim"].append(ms_ssim(image, reference, percentile))
                scores[name]["psnr"].append(psnr(image, reference, percentile))
            if progress is not None:
                progress(i + 1, len(source))
    summary: dict[str, Any] = {
        "pairs": len(source),
        "reference": "ground truth" if use_truth else "TIRF",
    }
    for name, metrics in scores.items():
        summary[name] = {
            f"{metric}_{stat}": float(fn(values))
            for metric, values in metrics.items()
            for stat, fn in (("mean", np.mean), ("sd", np.std))
        }
    return summary


# --------------------------------------------------------------------------- internals


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device) -> Any:
    dtype = _amp_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


def _grad_scaler() -> Any:
    """A CUDA GradScaler (torch.amp's, or torch.cuda.amp's before torch 2.3)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 0x7A1]).generate_state(1)[0])


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _Run:
    """One training run: data, optimizer, schedule and the files in `out`."""

    def __init__(
        self,
        model: ETNet,
        train_source: PairSource,
        val_source: PairSource | None,
        settings: TrainSettings,
        out: Path,
        device: str | torch.device,
        baseline: bool,
        samples_per_epoch: int | None,
        kind: str,
        init_from: str | None,
        supervise: str = "ctirf",
        stack: dict[str, Any] | None = None,
        keep_resume: bool = False,
    ) -> None:
        if len(train_source) == 0:
            raise TrainError(f"{train_source.description}: no training pairs")
        # "ctirf": g * psf against measured TIRF (train, finetune); "g": the pseudo-GT map
        # itself against a teacher's g on the input's scale; "g_slicewise": a 3D g as a 2D
        # teacher sees it plane by plane (ETNet.slicewise_view) against that teacher (distill)
        self.supervise = supervise
        self.stack = stack
        self.keep_resume = keep_resume
        self.settings = settings
        self.out = out
        self.baseline = baseline
        self.kind = kind
        self.init_from = init_from
        self.train_source = train_source
        self.val_source = val_source if val_source is not None and len(val_source) else None
        spe = samples_per_epoch or max(len(train_source), settings.batch_size)
        # the input clip is part of the model: a fine-tune keeps its base model's unless
        # the settings name one, and the checkpoint records it for inference
        if "input_ceiling" in settings.model_fields_set:
            model.input_ceiling = settings.input_ceiling
        input_ceiling = model.input_ceiling
        self.train_data = CropDataset(
            train_source,
            settings.crop,
            settings.rotation_probability,
            settings.percentile,
            settings.seed,
            spe,
            variance_scaling=settings.variance_scaling,
            target_scale="input" if supervise.startswith("g") else "own",
            target_ceiling=settings.target_ceiling,
            input_ceiling=input_ceiling,
        )
        self.val_data = (
            CropDataset(
                self.val_source,
                settings.crop,
                percentile=settings.percentile,
                augment=False,
                variance_scaling=settings.variance_scaling,
                target_scale="input" if supervise.startswith("g") else "own",
                target_ceiling=settings.target_ceiling,
                input_ceiling=input_ceiling,
            )
            if self.val_source is not None
            else None
        )
        # inside a torchrun session (training.distributed) the run is data-parallel: DDP
        # for the steps, this rank's share of the crops, rank 0 alone writes the files
        self.parallel = distributed.active()
        self.writes = self.parallel is None or self.parallel.is_main
        self.device = self.parallel.device(device) if self.parallel else select_device(device)
        self.model = model.to(self.device)
        self.net = self.parallel.wrap(self.model, self.device) if self.parallel else self.model
        per_rank = len(self.train_data)
        if self.parallel:  # DistributedSampler gives each rank an equal share
            per_rank = self.parallel.share(per_rank)
        self.steps_per_epoch = math.ceil(per_rank / settings.batch_size)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.warmup_epochs = min(settings.warmup_epochs, settings.epochs - 1)
        self.warmup_steps = self.warmup_epochs * self.steps_per_epoch
        self.loss_fn = HybridLoss(settings.loss, baseline=baseline)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        amp = _amp_dtype(self.device)
        self.scaler = _grad_scaler() if amp == torch.float16 else None
        self.fingerprint = _json_roundtrip(
            {
                "kind": kind,
                "architecture": model.arch_config(),
                "optics": model.optics.model_dump(),
                "settings": settings.model_dump(),
                "baseline": baseline,
                "data": train_source.description,
                "train_fields": sorted(set(train_source.fields)),
                "val_fields": sorted(set(self.val_source.fields)) if self.val_source else [],
                "samples_per_epoch": spe,
                "init_from": init_from,
                **({"processes": self.parallel.world_size} if self.parallel else {}),
            }
        )
        self.history: list[dict[str, Any]] = []
        self.best_loss = math.inf
        self.step = 0

    # ----------------------------------------------------------------- files / resume

    @property
    def best_path(self) -> Path:
        return self.out / BEST

    @property
    def last_path(self) -> Path:
        return self.out / LAST

    def _provenance(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "data": self.train_source.description,
            "train_pairs": len(self.train_source),
            "val_pairs": len(self.val_source) if self.val_source else 0,
            "epochs": self.settings.epochs,
            "seed": self.settings.seed,
            "settings": self.settings.model_dump(),
            "warmup_epochs_used": self.warmup_epochs,
            "baseline": self.baseline,
            "init_from": self.init_from,
            "device": str(self.device),
            # which pairs shaped this checkpoint (training and selection), so evaluation
            # can hold them out
            "train_files": self.train_source.files,
            "val_files": self.val_source.files if self.val_source else [],
            **({"stack": self.stack} if self.stack else {}),
        }

    def _save_resume_state(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, entry in opt["state"].items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{idx}.{name}"] = value
                else:
                    scalars.setdefault(str(idx), {})[name] = value
        header = {
            "epochs_done": len(self.history),
            "step": self.step,
            "best_loss": self.best_loss,
            "history": self.history,
            "fingerprint": self.fingerprint,
            "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        cpu = {
            k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in tensors.items()
        }
        meta = {RESUME_KEY: json.dumps(_json_roundtrip(header))}
        atomic_write(self.out / RESUME, lambda tmp: safetensors.torch.save_file(cpu, tmp, meta))

    def _load_resume_state(self) -> bool:
        """Restore the last finished epoch from `out`; False when there is none."""
        path = self.out / RESUME
        if not path.is_file():
            return False
        try:
            with safetensors.safe_open(str(path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {})[RESUME_KEY])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (safetensors.SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise TrainError(
                f"{path} is unreadable ({exc}); delete it or pass resume=False (--no-resume)"
            ) from None
        self._check_same_run(header["fingerprint"])
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        check_state_dict(self.model, weights)
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, entry in header["optimizer_scalars"].items():
            state.setdefault(int(idx), {}).update(entry)
        self.optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
        if self.scaler is not None and header.get("scaler"):
            self.scaler.load_state_dict(header["scaler"])
        self.history = header["history"]
        self.best_loss = float(header["best_loss"])
        self.step = int(header["step"])
        if self.writes:
            self._rewrite_logs()
        return True

    def _rewrite_logs(self) -> None:
        """Make metrics.jsonl / steps.jsonl match the restored history (drop later lines)."""
        lines = "".join(json.dumps(rec) + "\n" for rec in self.history)
        atomic_write(self.out / METRICS, lambda tmp: tmp.write_text(lines))
        steps = self.out / STEPS
        if steps.is_file():
            kept = [
                line
                for line in steps.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step
            ]
            text = "".join(f"{line}\n" for line in kept)
            atomic_write(steps, lambda tmp: tmp.write_text(text))

    def _start_fresh(self) -> None:
        for name in (RESUME, METRICS, STEPS, FINISHED):
            (self.out / name).unlink(missing_ok=True)

    def _finish(self) -> None:
        """A completed run keeps a small record instead of its resume state (optimizer
        moments and weights, ~80 MB for S0), unless asked to keep it."""
        if self.keep_resume:
            return
        record = {
            "fingerprint": self.fingerprint,
            "history": self.history,
            "best_loss": self.best_loss,
            "step": self.step,
        }
        atomic_write(
            self.out / FINISHED,
            lambda tmp: tmp.write_text(json.dumps(_json_roundtrip(record), indent=1)),
        )
        (self.out / RESUME).unlink(missing_ok=True)

    def _check_same_run(self, theirs: dict[str, Any]) -> None:
        """Refuse to resume a run recorded with another fingerprint, naming what differs."""
        if theirs == self.fingerprint:
            return
        changed = sorted(
            k
            for k in set(theirs) | set(self.fingerprint)
            if theirs.get(k) != self.fingerprint.get(k)
        )
        raise TrainError(
            f"{self.out} holds a different run (differs in {', '.join(changed)}); "
            "use another output folder or start over with --no-resume"
        )

    def _load_finished(self) -> bool:
        """Whether `out` holds this very run, completed (its resume state already gone)."""
        path = self.out / FINISHED
        if not path.is_file() or (self.out / RESUME).is_file():
            return False
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        self._check_same_run(record.get("fingerprint") or {})
        self.history = record["history"]
        self.best_loss = float(record["best_loss"])
        self.step = int(record["step"])
        return True

    # ------------------------------------------------------------------------ loop

    def fit(
        self,
        resume: bool,
        progress: bool,
        log_every: int,
        on_step: Callable[[dict[str, Any]], None] | None,
        on_epoch: Callable[[dict[str, Any]], None] | None,
    ) -> TrainResult:
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
        notes: list[str] = []
        resumed = resume and (self._load_resume_state() or self._load_finished())
        if self.parallel:
            self.parallel.agree(len(self.history) if resumed else -1, "resume states", self.device)
        if resumed:
            done = len(self.history)
            if done >= self.settings.epochs:
                notes.append(
                    f"{self.out} already holds the finished run ({done} epochs); "
                    "start over with --no-resume (resume=False)"
                )
                console.print(notes[-1], highlight=False)
                return self._result(notes)
            notes.append(f"resumed {self.out} after epoch {done}")
            console.print(notes[-1], highlight=False)
        elif self.writes:
            self._start_fresh()
        progress = progress and self.writes
        bar = _progress_bar(progress and console.is_terminal)
        try:
            with bar:
                task = bar.add_task(
                    "train",
                    total=self.total_steps,
                    completed=self.step,
                    loss=self.history[-1]["train_loss"] if self.history else 0.0,
                    epoch=f"{len(self.history)}/{self.settings.epochs}",
                )
                for epoch in range(len(self.history), self.settings.epochs):
                    record = self._epoch(epoch, bar, task, log_every, on_step)
                    if progress and not console.is_terminal:
                        console.print(_epoch_line(record, self.settings.epochs), highlight=False)
                    if on_epoch is not None:
                        on_epoch(record)
        except KeyboardInterrupt:
            if self.writes:
                self._report_interrupt()
            raise
        if self.writes:
            self._finish()
        if self.parallel:
            self.parallel.barrier()
        return self._result(notes)

    def _result(self, notes: list[str]) -> TrainResult:
        return TrainResult(
            self.best_path, self.best_loss, list(self.history), self.last_path, notes
        )

    def _epoch(
        self,
        epoch: int,
        bar: Any,
        task: Any,
        log_every: int,
        on_step: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        seed = _epoch_seed(self.settings.seed, epoch)
        torch.manual_seed(seed + (self.parallel.rank if self.parallel else 0))
        self.train_data.set_epoch(epoch)
        if self.parallel:
            order: dict[str, Any] = {"sampler": self.parallel.sampler(self.train_data, seed, epoch)}
        else:
            order = {"shuffle": True, "generator": torch.Generator().manual_seed(seed)}
        loader = DataLoader(
            self.train_data,
            batch_size=self.settings.batch_size,
            pin_memory=self.device.type == "cuda",
            **order,
        )
        self.model.train()
        sums: dict[str, float] = {}
        batches = 0
        for batch in loader:
            lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.settings.lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            terms = self._train_step(batch)
            self.step += 1
            batches += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            step_record = {"step": self.step, "epoch": epoch + 1, "lr": lr, **terms}
            if log_every and self.step % log_every == 0 and self.writes:
                with open(self.out / STEPS, "a") as fh:
                    fh.write(json.dumps(step_record) + "\n")
            if on_step is not None:
                on_step(step_record)
            bar.update(
                task, advance=1, loss=terms["total"], epoch=f"{epoch + 1}/{self.settings.epochs}"
            )
        record: dict[str, Any] = {"epoch": epoch + 1}
        means = {k: v / batches for k, v in sums.items()}
        if self.parallel:
            means = self.parallel.mean(means, self.device)
            self.parallel.sync_buffers(self.model)
        record.update({f"train_{k}": v for k, v in means.items()})
        record["train_loss"] = record.pop("train_total")
        val_loss, val_msssim = self._validate()
        record.update({"val_loss": val_loss, "val_ms_ssim": val_msssim, "lr": lr})
        selection = record["train_loss"] if val_loss is None else val_loss
        record["best"] = bool(selection < self.best_loss)
        record["seconds"] = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "val_loss": val_loss,
            "val_ms_ssim": val_msssim,
            "train_loss": record["train_loss"],
            "selected_by": "train_loss" if val_loss is None else "val_loss",
        }
        if record["best"]:
            self.best_loss = selection
            if self.writes:
                self._save_model(self.best_path, metrics)
        self.history.append(record)
        if self.writes:
            self._save_model(self.last_path, metrics)
            self._save_resume_state()
            with open(self.out / METRICS, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        return record

    def _forward_loss(
        self, batch: dict[str, torch.Tensor], net: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
        """(loss, its terms, cTIRF, TIRF) of one batch through `net` (the bare model)."""
        epi = batch["epi"].to(self.device, non_blocking=True)
        tirf = batch["tirf"].to(self.device, non_blocking=True)
        weight = batch["weight"].to(self.device, non_blocking=True)
        with _autocast(self.device):
            out = (net or self.model)(epi)
        if self.supervise == "g_slicewise":
            pred = self.model.slicewise_view(out.g)
        else:
            pred = out.g if self.supervise == "g" else out.ctirf
        loss, terms = self.loss_fn(pred, tirf, out.recon, epi, out.g, out.b, weight)
        return loss, terms, pred, tirf

    def _train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms, _, _ = self._forward_loss(batch, self.net)
        if not torch.isfinite(loss):
            raise TrainError(
                f"the loss became {loss.item()} at step {self.step + 1}; lower the learning "
                "rate or check the data for empty or saturated frames"
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return terms

    def _validate(self) -> tuple[float | None, float | None]:
        if self.val_data is None:
            return None, None
        self.model.eval()
        data = self.val_data
        if self.parallel:  # each rank its share; the sums are added up below
            data = Subset(self.val_data, self.parallel.shard(len(self.val_data)))
        loader = DataLoader(data, batch_size=self.settings.batch_size)
        total, msssim, count = 0.0, 0.0, 0
        with torch.no_grad():
            for batch in loader:
                loss, _, ctirf, tirf = self._forward_loss(batch)
                n = batch["epi"].shape[0]
                total += float(loss) * n
                msssim += float(structural_similarity(ctirf.float(), tirf).sum())
                count += n
        if self.parallel:
            total, msssim, count = self.parallel.sum([total, msssim, count], self.device)
        return total / count, msssim / count

    def _save_model(self, path: Path, metrics: dict[str, Any]) -> None:
        save_model(
            self.model,
            path,
            percentile=self.settings.percentile,
            provenance=self._provenance(),
            metrics=metrics,
            stack=self.stack,
        )

    def _report_interrupt(self) -> None:
        done = len(self.history)
        if done == 0:
            console.print("[yellow]interrupted[/] before the first epoch finished; nothing saved")
            return
        console.print(
            f"[yellow]interrupted[/] after epoch {done}/{self.settings.epochs}: best checkpoint "
            f"{self.best_path}, last {self.last_path}; run the same command again to resume",
            highlight=False,
        )


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One log line per epoch, for output that is not a terminal (no progress bar there)."""
    val = record.get("val_loss")
    tail = "" if val is None else f", val loss {val:.4f}, val MS-SSIM {record['val_ms_ssim']:.4f}"
    best = " (best)" if record.get("best") else ""
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}{tail}, "
        f"{record['seconds']:.0f} s{best}"
    )


def _progress_bar(show: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps, loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
    )
