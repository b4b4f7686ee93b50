"""Reports a user reads or looks at: the dataset, a model's layers, a bundle's predictions.

    python -m classifier.reports data --data path/to/folder        counts, statistics, samples
    python -m classifier.reports model --model tutorial_mlp tutorial_tanh_cnn --num-classes 2
    python -m classifier.reports samples runs/latest/bundle --data path/to/folder

Each report is a function returning plain data (and writing its pictures), so the app and the
tests use them without the command line; `__main__` prints them as Markdown.
"""

from classifier.reports.dataset import DatasetReport, dataset_report
from classifier.reports.model import ModelReport, model_report
from classifier.reports.samples import samples_report

__all__ = ["DatasetReport", "dataset_report", "ModelReport", "model_report", "samples_report"]
