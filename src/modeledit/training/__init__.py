"""Training learned editors: the one trainer loop and the meta-training data they share."""

from .data import (
    EditBatches,
    MetaBatch,
    TensorMetaBatch,
    first_divergence,
    meta_batch,
    split_train_val,
    tensor_meta_batch,
    validation_batches,
    wiki_sentences,
)
from .trainer import LearnedEditor, TrainConfig, train_editor, validate

__all__ = [
    "EditBatches",
    "LearnedEditor",
    "MetaBatch",
    "TensorMetaBatch",
    "TrainConfig",
    "first_divergence",
    "meta_batch",
    "split_train_val",
    "tensor_meta_batch",
    "train_editor",
    "validate",
    "validation_batches",
    "wiki_sentences",
]
