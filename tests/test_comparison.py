"""The sweep's comparison report: the page, its plots, and the abnormal seed it flags among repeats."""

from __future__ import annotations

import json

from orchestrator.stages.comparison import seed_outliers, write_comparison
from orchestrator.stages.context import TrialOutcome as Outcome


def outcome(name: str, values: dict, evals: list[float], status: str = "finished") -> Outcome:
    metrics = [{"step": 2 * (i + 1), "loss": e + 0.1, "eval_loss": e, "tokens_per_s": 1000.0, "step_s": 0.5}
               for i, e in enumerate(evals)]
    return Outcome(name, values, status, best=min(evals), params=1024,
                   result={"metrics": metrics, "eval_loss_at_start": 4.6, "best_step": 2 * len(evals),
                           "total_steps": 2 * len(evals)})


def test_the_abnormal_seed_is_flagged_and_the_page_shows_every_trial(tmp_path):
    seeds = [outcome("t00-seed0", {"train.seed": 0}, [3.50, 3.20, 3.10]),
             outcome("t01-seed1", {"train.seed": 1}, [3.52, 3.22, 3.08]),
             outcome("t02-seed2", {"train.seed": 2}, [3.49, 3.18, 3.12]),
             outcome("t03-seed3-lr2", {"train.seed": 3, "train.learning_rate": 2.0}, [5.9, 5.1, 4.8])]
    flags = write_comparison(tmp_path, seeds, ["train.seed", "train.learning_rate"], [], "eval_loss", "t01-seed1")
    assert list(flags) == ["t03-seed3-lr2"] and "for its 3 other seeds" in flags["t03-seed3-lr2"]
    page = (tmp_path / "sweep.html").read_text()
    assert all(o.name in page for o in seeds) and "flagged seeds" in page
    assert {p.name for p in tmp_path.glob("*.png")} == {"sweep_curves.png", "sweep_train_seed.png",
                                                        "sweep_train_learning_rate.png"}
    assert json.loads((tmp_path / "sweep.json").read_text())["flagged"] == flags


def test_a_curve_that_strays_is_flagged_even_when_it_ends_among_its_repeats():
    seeds = [outcome("a", {"train.seed": 0}, [3.5, 3.2, 3.1]), outcome("b", {"train.seed": 1}, [3.5, 3.21, 3.1]),
             outcome("c", {"train.seed": 2}, [3.52, 3.2, 3.11]), outcome("d", {"train.seed": 3}, [9.0, 8.0, 3.1])]
    assert list(seed_outliers(seeds, [], "eval_loss")) == ["d"]
    assert "eval curve strays" in seed_outliers(seeds, [], "eval_loss")["d"]


def test_no_flag_without_three_seeds_of_one_configuration():
    grid = [outcome("a", {"adapter.r": 4, "train.seed": 0}, [3.1]), outcome("b", {"adapter.r": 8, "train.seed": 0},
                                                                            [3.0]),
            outcome("c", {"adapter.r": 4, "train.seed": 1}, [3.1]), outcome("d", {"adapter.r": 8, "train.seed": 1},
                                                                            [9.0])]
    assert seed_outliers(grid, ["adapter.r", "train.seed"], "eval_loss") == {}  # two seeds per r: no call
    assert seed_outliers(grid[:2], [], "eval_loss") == {}  # repeats must differ in seed
