"""Training learned editors: the one trainer loop and the meta-training data they share."""

from .data import EditBatches, MetaBatch, meta_batch, split_train_val, validation_batches, wiki_sentences
from .trainer import LearnedEditor, TrainConfig, train_editor, validate

__all__ = [
    "EditBatches",
    "LearnedEditor",
    "MetaBatch",
    "TrainConfig",
    "meta_batch",
    "split_train_val",
    "train_editor",
    "validate",
    "validation_batches",
    "wiki_sentences",
]
