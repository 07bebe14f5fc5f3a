"""Console scripts, one module each: ``dlg-sample`` (:mod:`.sample`), ``dlg-export`` (:mod:`.export`), ``dlg-tune``
(:mod:`.tune`) and ``dlg-train-classifier`` (:mod:`.train_classifier`); what they share is in :mod:`.common`."""

from .export import export_main, export_parser
from .sample import sample_main, sample_parser
from .train_classifier import train_classifier_main, train_classifier_parser
from .tune import tune_main, tune_parser

__all__ = ["export_main", "export_parser", "sample_main", "sample_parser", "train_classifier_main",
           "train_classifier_parser", "tune_main", "tune_parser"]
