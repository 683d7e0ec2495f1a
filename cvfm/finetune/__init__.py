"""`cvfm finetune`: train the classifier that machine unlearning starts from.

Two ways, one output (`<run>/classifier/`, a `Classifier`): full fine-tuning, the pre-training loop with
the `supervised` method (`run.py`), or a frozen backbone with a linear or k-NN head (`frozen.py`).
run.json["finetune"] holds the `FinetuneConfig` (`config.py`), so the recipe can be rerun
(`cvfm unlearn --method retrain`), and data_items.jsonl the items it was trained on (`cvfm.data.digest`),
so that rerun can be checked to see the same data.
"""

from cvfm.finetune.config import FinetuneConfig, recipe
from cvfm.finetune.data import open_training_data
from cvfm.finetune.frozen import fit_frozen_classifier
from cvfm.finetune.run import finetune

__all__ = ["FinetuneConfig", "finetune", "fit_frozen_classifier", "open_training_data", "recipe"]
