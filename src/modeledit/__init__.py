"""modeledit: edit pre-trained neural networks locally, with reversible patches.

    from modeledit import load_model, create_editor, EditRequest, Patch
    model, tokenizer = load_model("default")
    editor = create_editor("ft-l", model, tokenizer)
    patch = editor.edit([EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                                     target_new="English")])
    patch.apply(model); patch.revert(model)
"""

from .editor import available_methods, create_editor
from .ledger import Ledger
from .models import fingerprint, load_model
from .patch import Patch, PatchError
from .requests import EditRequest, EditRequestError, load_requests

__all__ = [
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
