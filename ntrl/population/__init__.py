"""Populations: many runs of one architecture trained as one batched computation (see trainer)."""

from ntrl.population.trainer import (  # noqa: F401
    MEMBER_FIELDS, PopulationResult, TrackSchedule, train_population, unsupported_reason,
)
