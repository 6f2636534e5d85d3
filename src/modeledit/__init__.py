"""modeledit: edit pre-trained neural networks locally, with reversible patches.

    from modeledit import load_model, create_editor, EditRequest, Patch
    model, tokenizer = load_model("default")
    editor = create_editor("ft-l", model, tokenizer)
    patch = editor.edit([EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                                     target_new="English")])
    patch.apply(model); patch.revert(model)

Any other nn.Module: create_editor("ft", model, task="classification") edits TensorEdit(inputs, targets).
"""

from .editor import available_methods, create_editor
from .ledger import Ledger
from .models import fingerprint, load_model
from .patch import Patch, PatchError
from .requests import EditRequest, EditRequestError, load_requests
from .tasks import ClassificationTask, LossTask, RegressionTask, Task, TensorEdit

__all__ = [
    "ClassificationTask",
    "LossTask",
    "RegressionTask",
    "Task",
    "TensorEdit",
    "EditRequest",
    "EditRequestError",
    "Ledger",
    "Patch",
    "PatchError",
    "available_methods",
    "create_editor",
    "fingerprint",
    "load_model",
    "load_requests",
]
