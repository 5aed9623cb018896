"""Progressive bit widths (APoT's schedule): the layers at ``bits`` train at higher widths first, stage by stage."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from qat_lightning.nn import FakeQuantizedModule, LayerPlan
from qat_lightning.quant import FakeQuantizer
from qat_lightning.quant.primitives import MAX_BITS


def _is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class ProgressiveBits:
    """The stages of a progressive schedule, in epochs: which bit width the layers at ``bits`` train at when.

    Fake quantization starts at ``warmup_epochs`` with the layers at ``bits`` (the recipe's width) on the grid of
    ``progressive[0]``; stage ``i`` lasts ``progressive_epochs[i]`` epochs (an integer: every stage lasts that
    long), then the next, narrower stage starts from its scales (``FakeQuantizer.set_bits``: the clipping range
    is kept and divided into fewer levels) and after the last one the layers train at ``bits`` (the final
    stage). Layers the recipe gives another width (``first_last_bits``, ``layer_bits``) keep it throughout; the
    inputs of a layer at ``bits`` follow it when they are at ``bits`` too. ``progressive=()`` is no schedule.

    Attributes:
        stage: the current stage, 0..``len(progressive)`` (the final one); checkpointed by the callback.

    Raises:
        ValueError: ``progressive`` not strictly decreasing widths above ``bits`` (at most 16), stage lengths
            that are not positive integers (one, or one per stage), a schedule with ``mode="ptq"`` or in steps
            (``warmup_steps``).
    """

    def __init__(
        self,
        bits: int,
        progressive: Sequence[int],
        progressive_epochs: int | Sequence[int],
        warmup_epochs: int,
        mode: str = "qat",
        warmup_steps: int | None = None,
    ) -> None:
        if isinstance(progressive, (str, bytes)) or not isinstance(progressive, Sequence):
            progressive = (progressive,)  # type: ignore[assignment]  # reported below
        widths = tuple(progressive)
        valid = all(_is_count(b, bits + 1) and b <= MAX_BITS for b in widths)
        if not valid or any(a <= b for a, b in zip(widths, widths[1:], strict=False)):
            raise ValueError(
                f"`progressive` must be strictly decreasing bit widths in {bits + 1}..{MAX_BITS}, each above `bits`"
                f"={bits} (the final stage), e.g. ({bits + 2}, {bits + 1}), or () for none; got {progressive!r}."
            )
        if _is_count(progressive_epochs, 1):
            durations = (progressive_epochs,) * len(widths)
        elif (
            isinstance(progressive_epochs, Sequence)
            and len(progressive_epochs) == len(widths)
            and all(_is_count(d, 1) for d in progressive_epochs)
        ):
            durations = tuple(progressive_epochs)
        else:
            raise ValueError(
                "`progressive_epochs` must be a positive integer (the epochs of every stage) or one positive integer "
                f"per stage of `progressive`={widths} ({len(widths)} values), got {progressive_epochs!r}."
            )
        if widths and mode != "qat":
            raise ValueError(f"`progressive` needs mode='qat' (training at each width), got mode={mode!r}.")
        if widths and warmup_steps is not None:
            raise ValueError(
                "`progressive` stages are scheduled in epochs: give `warmup_epochs`, not "
                f"`warmup_steps`={warmup_steps}."
            )
        self.widths = (*widths, bits)
        self.starts = [warmup_epochs]
        for duration in durations:
            self.starts.append(self.starts[-1] + duration)
        self.stage = 0

    @property
    def final_stage(self) -> int:
        return len(self.widths) - 1

    @property
    def final_epoch(self) -> int:
        """The epoch at which the layers start training at ``bits``."""
        return self.starts[-1]

    def bits_of(self, stage: int) -> int:
        return self.widths[stage]

    def stage_at(self, epoch: int) -> int:
        """The stage the schedule is in at ``epoch`` (0 before and during the first one)."""
        return max(i for i, start in enumerate(self.starts) if start <= epoch or i == 0)

    def check_freezes(self, **freezes: int | None) -> None:
        """Raise a ``ValueError`` for a BatchNorm/observer freeze inside the progressive stages (or in steps)."""
        if self.final_stage == 0:
            return
        for name, value in freezes.items():
            if value is None:
                continue
            if name.endswith("_step"):
                raise ValueError(
                    f"`progressive` stages are scheduled in epochs: give `{name[: -len('step')]}epoch`, not `{name}`."
                )
            if value < self.final_epoch:
                spans = zip(self.widths, self.starts, self.starts[1:], strict=False)
                stages = ", ".join(f"{b} bits in epochs {s}..{e - 1}" for b, s, e in spans)
                raise ValueError(
                    f"`{name}`={value} overlaps the progressive stages ({stages}); BatchNorm and observers freeze in "
                    f"the final {self.widths[-1]}-bit stage, which starts at epoch {self.final_epoch}: use a value >= "
                    f"{self.final_epoch}."
                )

    def scheduled(self, model: nn.Module, plan: Sequence[LayerPlan]) -> list[FakeQuantizer]:
        """The quantizers that follow the schedule: those of the layers planned at ``bits`` (their inputs too when
        planned at ``bits``), an attention module's ``out_proj`` with it."""
        bits = self.widths[-1]
        modules = dict(model.named_modules())
        found: dict[int, FakeQuantizer] = {}
        for layer in plan:
            if layer.weight.bits != bits or layer.name not in modules:
                continue
            module = modules[layer.name]
            parts = [m for m in (module, getattr(module, "out_proj", None)) if isinstance(m, FakeQuantizedModule)]
            for part in parts:
                found.update((id(q), q) for q in part.weight_quantizers().values())
                if layer.activation is not None and layer.activation.bits == bits:
                    inputs = part.input_quantizers().values()
                    found.update((id(q), q) for q in inputs if isinstance(q, FakeQuantizer))
        return list(found.values())

    def apply(self, model: nn.Module, plan: Sequence[LayerPlan]) -> None:
        """Put the scheduled quantizers of ``model`` on the current stage's width."""
        if self.final_stage == 0:
            return
        for quantizer in self.scheduled(model, plan):
            quantizer.set_bits(self.bits_of(self.stage))

    def advance(self, epoch: int, model: nn.Module, plan: Sequence[LayerPlan]) -> None:
        """Move to the stage of ``epoch`` if it is a later one, each quantizer starting from its current scales."""
        target = self.stage_at(epoch)
        if target <= self.stage:
            return
        old = self.bits_of(self.stage)
        self.stage = target
        self.apply(model, plan)
        rank_zero_info(
            f"QuantizationCallback: progressive stage {target} at epoch {epoch}: the layers at {self.widths[-1]} "
            f"bits move from {old} to {self.bits_of(target)} bits, starting from their current clipping ranges."
        )
