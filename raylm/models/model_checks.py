"""Facts about Hugging Face model folders and configs that modeling.py and electra.py both check.

(a folder or hub name, a config) -> ModelError for a folder that cannot hold a model; the positions
one example may use. Kept below both modules so that neither imports the other for them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Iterator, Optional

from transformers import PretrainedConfig

from raylm.data import storage
from raylm.errors import ModelError
from raylm.models.sharded_weights import check_not_sharded_half


def check_local_model_folder(source: str, field_name: str) -> None:
    if storage.is_remote(source):
        # LanguageModelingModel downloads model_name, generator_name and discriminator_name before this check.
        raise ModelError(
            f"The {field_name} {source!r} is in object storage, which raylm reads only for model_name, generator_name "
            "and discriminator_name",
            f"Download it to a local folder and point {field_name} there, or pass the model folder as model_name",
        )
    looks_local = os.path.isabs(source) or source.startswith(".") or os.path.exists(source)
    if looks_local and not os.path.isdir(source):
        raise ModelError(f"The {field_name} folder {source!r} does not exist", "Check the path, or use a hub name")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelError(
            f"The {field_name} folder {source!r} has no config.json",
            "Point it to a folder written by save_pretrained (raylm's output_dir is one)",
        )


@contextlib.contextmanager
def loading_weights(source: str) -> Iterator[None]:
    """from_pretrained(source) inside: a folder or hub name that cannot be read is a ModelError.

    transformers reads pytorch_model.bin weights with torch.load(weights_only=True): a file that needs
    more than tensors could run any code when unpickled, so it stops there, and so does raylm.
    """
    check_not_sharded_half(source, "model")
    try:
        yield
    except pickle.UnpicklingError:
        raise ModelError(
            f"The weights of {source!r} hold objects other than tensors, so raylm refuses to unpickle them (that could "
            "run any code)",
            "Use a model whose weights are model.safetensors, or convert these to safetensors where you trust their "
            "source",
        ) from None
    except (OSError, ValueError) as err:
        raise ModelError(
            f"Cannot load the model {source!r}: {str(err).splitlines()[0]}",
            "Use a folder written by save_pretrained, or a hub name reachable from this machine",
        ) from None


def max_positions(config: PretrainedConfig) -> Optional[int]:
    """Tokens one example may hold: the position table size, less RoBERTa-style padding offsets."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            if (
                config.model_type in ("roberta", "camembert", "xlm-roberta", "longformer")
                and name == "max_position_embeddings"
            ):
                # These count positions from padding_idx + 1.
                value -= (config.pad_token_id or 0) + 1
            return value
    return None
