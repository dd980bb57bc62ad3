"""Steps whose loss or gradients are not finite: skipped and counted, and what repeated ones mean.

On CUDA, float16 training has ``GradScaler``: a step with an inf or NaN gradient is skipped and the
scale lowered. bfloat16 on the CPU has no scaler (it needs none for range), yet a step can still come
back non-finite from a kernel's own fault: on an AMD Zen 4 CPU (AVX-512 BF16, no AMX) oneDNN's bf16
backward-weights kernel returns garbage for 3D inputs two voxels deep (``models.layers.Conv3d`` now keeps
those layers in float32). One such step must not end a scheduled run: it is skipped (the weights and the
optimiser state stay as they were) and counted. When they repeat, bfloat16 is not to be trusted on this
machine: the run goes on in float32 (slower, exact).
Only float32 steps that keep failing mean the training itself diverged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["ok", "skip", "fall_back", "fail"]

#: Non-finite steps in reduced precision after which the run continues in float32.
FALL_BACK_AFTER = 3
#: Consecutive non-finite float32 steps after which training has diverged.
FAIL_AFTER = 5


@dataclass
class NonFiniteSteps:
    """Counts skipped steps and says when reduced precision has failed, or training has diverged.

    Args:
        fall_back_after: non-finite steps in reduced precision (over the run) before switching to float32.
        fail_after: consecutive non-finite steps in float32 before the run has diverged.
        skipped: steps skipped so far (``last.pt`` keeps it across a resume).
        fell_back: the run switched from reduced precision to float32 (``last.pt`` keeps it).
    """

    fall_back_after: int = FALL_BACK_AFTER
    fail_after: int = FAIL_AFTER
    skipped: int = 0
    fell_back: bool = False
    _reduced: int = 0
    _consecutive: int = 0

    def record(self, finite: bool, reduced_precision: bool) -> Action:
        """Record one step and say what to do.

        Args:
            finite: the step's loss and gradient norm were finite (it was taken).
            reduced_precision: the step ran under bfloat16 autocast.

        Returns:
            ``ok`` (the step was taken), ``skip`` (it was not; go on), ``fall_back`` (it was not, and the
            run must go on in float32 from the next step) or ``fail`` (float32 keeps failing: diverged).
        """
        if finite:
            self._consecutive = 0
            return "ok"
        self.skipped += 1
        self._consecutive += 1
        if reduced_precision:
            self._reduced += 1
            if self._reduced >= self.fall_back_after:
                self.fell_back = True
                self._consecutive = 0
                return "fall_back"
            return "skip"
        return "fail" if self._consecutive >= self.fail_after else "skip"
