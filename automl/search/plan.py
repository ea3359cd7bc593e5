"""The plan: how the budget is spent (trial length, ASHA's rungs, how many trials, what runs after the search)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from automl.budget import Budget, Costs
from automl.search.space import SearchSpace, for_data_size

SEARCH_FRACTION = 0.75  # share of the budget given to the search; retrain, evaluation and export use the rest


@dataclass
class Plan:
    """Decisions made before the search, with the reasons shown in the progress view and the model card."""

    space: SearchSpace                 # the space as searched (pins for the data applied)
    storage_size: int | None           # images: side they are stored at
    resources: dict                    # per trial: {"cpu": .., "gpu": ..}
    concurrency: int
    retrain_cpus: int                  # CPUs per Ray Train worker
    search_ends_at_s: float | None     # the search stops this many seconds after the run started
    max_trials: int | None
    retrain: bool = True               # refit the winner on train+validation (else export its own weights)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = self.space.name
        return d


def _storage_size(space: SearchSpace) -> int:
    spec = space.parameters.get("image_size", {"type": "fixed", "value": 32})
    values = spec.get("values") or [spec.get("value") or spec.get("high") or 32]
    return int(max(values))


def make_plan(space: SearchSpace, *, modality: str, n_train: int, budget: Budget, costs: Costs,
              resources: dict, concurrency: int, retrain_cpus: int, max_trials: int | None, export_formats: bool) -> Plan:
    space = for_data_size(space, n_train)
    storage = _storage_size(space) if modality == "image" else None
    export_s = costs[f"export_{modality}_s"] if export_formats else costs["evaluate_s"]
    ends_at = None
    if budget.total_s is not None:
        ends_at = max(budget.elapsed() + 10.0, SEARCH_FRACTION * budget.total_s - costs["ray_train_startup_s"]
                      - export_s)
        budget.reserve("export", export_s)
    return Plan(space, storage, resources, concurrency, retrain_cpus, ends_at, max_trials,
                reasons=[f"search gets {SEARCH_FRACTION:.0%} of the budget less Ray Train's start-up and the export"])
