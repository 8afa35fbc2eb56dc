"""Hydra's basic sweeper, its per-cell jobs grouped (eval.experiments.grouping). Hydra loads sweepers from the
``hydra_plugins`` namespace only; scripts/ is on the path of every entry point there, so this one is found."""

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from eval.experiments.grouping import group_jobs


class GroupedSweeper(BasicSweeper):
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.grouping = str(config.get("grouping", "cell"))

    def split_arguments(self, overrides, max_batch_size):
        jobs = group_jobs([job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch], self.grouping)
        size = max_batch_size or len(jobs) or 1
        return [jobs[start : start + size] for start in range(0, len(jobs), size)]
