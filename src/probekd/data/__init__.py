"""Multiple-choice data: the example type, file readers, named tasks and prompt templates."""

from probekd.data.examples import MCQExample, option_mask, split_stats
from probekd.data.tasks import Task, TaskSpec, list_tasks, load_task

__all__ = ["MCQExample", "Task", "TaskSpec", "list_tasks", "load_task", "option_mask", "split_stats"]
