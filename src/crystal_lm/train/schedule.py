"""Crystal's learning-rate shape per stage (crystal-spec §4).

Each stage: linear warmup 0 → peak, then linear decay towards `end` over `decay_steps`. Stage 1 stops
mid-decay (its decay is designed for stages 1+2 together); stage 2 re-warms to the LR stage 1 reached and
continues the same line; stage 3 has its own short schedule. Values are the base LR; the optimizer's muP
groups scale it (hidden matrices: /m_d).
"""

from __future__ import annotations

from dataclasses import dataclass

from crystal_lm.config import Recipe


@dataclass(frozen=True)
class LinearSchedule:
    warmup_steps: int
    peak: float
    end: float
    decay_steps: int

    def lr(self, step: int) -> float:
        """Base LR used for the update of (0-based) `step` of the stage."""
        if step < self.warmup_steps:
            return self.peak * step / self.warmup_steps
        done = min(step - self.warmup_steps, self.decay_steps)
        return self.peak + (self.end - self.peak) * done / self.decay_steps


def stage_schedules(recipe: Recipe) -> list[LinearSchedule]:
    schedules: list[LinearSchedule] = []
    for i, stage in enumerate(recipe.stages):
        cfg, steps = stage.lr, recipe.stage_steps(stage)
        if cfg.continue_previous:
            prev, prev_steps = schedules[-1], recipe.stage_steps(recipe.stages[i - 1])
            decayed = max(0, prev_steps - prev.warmup_steps)
            schedules.append(
                LinearSchedule(
                    cfg.warmup_steps, prev.lr(prev_steps), prev.end, max(1, prev.decay_steps - decayed)
                )
            )
        else:
            assert cfg.peak is not None
            decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, steps - cfg.warmup_steps)
            schedules.append(
                LinearSchedule(cfg.warmup_steps, cfg.peak, cfg.end if cfg.end is not None else 0.0, decay)
            )
    return schedules


def schedule_warnings(recipe: Recipe) -> list[str]:
    """Stages whose warmup does not fit in them: their LR never reaches the peak the recipe names (a stage
    shortened by its token budget, or a warmup counted in the wrong unit)."""
    warnings = []
    for stage, schedule in zip(recipe.stages, stage_schedules(recipe), strict=True):
        steps = recipe.stage_steps(stage)
        if schedule.warmup_steps >= steps > 0 and schedule.warmup_steps:
            warnings.append(
                f"stage {stage.name!r}: lr.warmup_steps {schedule.warmup_steps} is not shorter than the stage "
                f"({steps} steps), so its LR rises only to {schedule.lr(steps - 1):.6g}, not {schedule.peak:.6g}"
            )
    return warnings
