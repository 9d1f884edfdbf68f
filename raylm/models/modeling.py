"""Models: (model_type, model_name, args) -> the objective and a HF model, with compatibility checks.

The objective follows the model type: gpt2/openai-gpt and other causal-only architectures train
with CLM, bert/roberta/distilbert/camembert and other masked-only ones with MLM. `mlm` must agree;
a mismatch is an error before anything starts (Simple Transformers let gpt2 + mlm=True reach the
first batch; bert + mlm=False would silently learn to copy its input). Architectures that have both
heads (e.g. model_type='auto'/'causal' or names the Auto classes know) follow `mlm`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from typing import TYPE_CHECKING, Optional

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from raylm.config import LanguageModelingArgs
from raylm.data.packing import document_inputs
from raylm.errors import ModelError
from raylm.models.electra import ElectraPair
from raylm.models.model_checks import check_local_model_folder, loading_weights, max_positions
from raylm.models.sharded_weights import load_sharded_weights, reads_from_shards, save_configs

if TYPE_CHECKING:
    import torch

MLM, CLM, ELECTRA = "mlm", "clm", "electra"

# Simple Transformers' model_type keys -> transformers' config model_type.
PEER_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "roberta",
    "distilbert": "distilbert",
    "camembert": "camembert",
    "xlmroberta": "xlm-roberta",
    "longformer": "longformer",
    "bigbird": "big_bird",
    "nystromformer": "nystromformer",
    "rembert": "rembert",
    "gpt2": "gpt2",
    "openai-gpt": "openai-gpt",
    "electra": "electra",
}
# Peer keys whose objective is fixed whatever the architecture also supports.
_FIXED_OBJECTIVE = {"gpt2": CLM, "openai-gpt": CLM, "electra": ELECTRA, "causal": CLM, "auto": MLM}
_FIXED_OBJECTIVE.update(
    {
        k: MLM
        for k in (
            "bert",
            "roberta",
            "distilbert",
            "camembert",
            "xlmroberta",
            "longformer",
            "bigbird",
            "nystromformer",
            "rembert",
        )
    }
)


def known_model_types() -> list[str]:
    return sorted(
        set(PEER_MODEL_TYPES)
        | {"auto", "causal"}
        | set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
        | set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    )


def resolve_objective(model_type: str, mlm: bool) -> str:
    """The training objective for a model type; ModelError when the type is unknown or `mlm` contradicts it."""
    if (
        model_type not in _FIXED_OBJECTIVE
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        import difflib

        close = difflib.get_close_matches(model_type, known_model_types(), n=3)
        raise ModelError(
            f"Unknown model_type {model_type!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""),
            "Use one of bert, roberta, distilbert, camembert, gpt2, openai-gpt, electra, auto, causal, or any "
            "masked/causal LM type that transformers knows",
        )
    objective = _FIXED_OBJECTIVE.get(model_type)
    if objective is None:
        masked, causal = (
            model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES,
            model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )
        objective = MLM if (masked and (mlm or not causal)) else CLM
    if objective == CLM and mlm:
        raise ModelError(
            f"model_type {model_type!r} is a causal language model, but mlm is True, which would train it on masked "
            "tokens",
            "Set mlm=False in the args for gpt2, openai-gpt and other causal models (mlm is True unless set)",
        )
    if objective in (MLM, ELECTRA) and not mlm:
        raise ModelError(
            f"model_type {model_type!r} is trained with "
            f"{'replaced-token detection on masked inputs' if objective == ELECTRA else 'masked language modeling'}, "
            "but mlm is False",
            "Set mlm=True (the default) for this model type",
        )
    return objective


def hf_model_type(model_type: str) -> Optional[str]:
    """transformers' config model_type for a raylm model type (None for 'auto'/'causal': it comes from the model)."""
    if model_type in ("auto", "causal"):
        return None
    return PEER_MODEL_TYPES.get(model_type, model_type)


def load_config(model_type: str, model_name: Optional[str], args: LanguageModelingArgs, **kwargs) -> PretrainedConfig:
    """config_name > model_name > the type's config class with args.config overrides (from scratch)."""
    source = args.config_name or model_name
    if source:
        check_local_model_folder(source, "config_name" if args.config_name else "model_name")
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=args.trust_remote_code, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(
                f"Cannot load a model config from {source!r}: {str(err).splitlines()[0]}",
                "Use a local folder saved by save_pretrained, or a hub name reachable from this machine",
            ) from None
        expected = hf_model_type(model_type)
        if expected and config.model_type != expected:
            raise ModelError(
                f"{source!r} holds a {config.model_type!r} model, not a {model_type!r} one",
                f"Pass model_type={config.model_type!r}, or point model_name to a {model_type} model",
            )
        for key, value in args.config.items():
            setattr(config, key, value)
        return config
    hf_type = hf_model_type(model_type)
    if hf_type is None:
        raise ModelError(
            f"model_type {model_type!r} needs model_name or config_name to know the architecture",
            "Pass a model_name (or config_name), or use a concrete model type such as 'bert' or 'gpt2'",
        )
    return CONFIG_MAPPING[hf_type](**args.config, **kwargs)


def check_folder_model_type(model_type: str, folder: str) -> None:
    """A local model folder must hold the requested model type (config.json's model_type)."""
    check_local_model_folder(folder, "model_name")
    expected = hf_model_type(model_type)
    config_path = os.path.join(folder, "config.json")
    if expected is None or not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as f:
        found = json.load(f).get("model_type")
    if found and found != expected:
        raise ModelError(
            f"{folder!r} holds a {found!r} model, not a {model_type!r} one",
            f"Pass model_type={found!r}, or point model_name to a {model_type} model",
        )


def model_class(objective: str):
    return AutoModelForCausalLM if objective == CLM else AutoModelForMaskedLM


def build_model(
    objective: str, config: PretrainedConfig, model_name: Optional[str], args: LanguageModelingArgs, **kwargs
) -> PreTrainedModel:
    """from_pretrained(model_name) when given, else a freshly initialised model from `config`
    (ELECTRA pairs: electra.build_pair)."""
    auto = model_class(objective)
    if model_name and os.path.isdir(model_name) and reads_from_shards(model_name):
        model = auto.from_config(config, trust_remote_code=args.trust_remote_code)
        load_sharded_weights(model, model_name)
        return model
    if model_name:
        with loading_weights(model_name):
            return auto.from_pretrained(model_name, config=config, trust_remote_code=args.trust_remote_code, **kwargs)
    return auto.from_config(config, trust_remote_code=args.trust_remote_code)


def fit_config_to_tokenizer(config: PretrainedConfig, tokenizer) -> None:
    """A config built from scratch, made to match the tokenizer trained or loaded for it (in place; the tokenizer's
    model_max_length follows the config's positions)."""
    # The tokenizer decides the vocabulary (GPT-2-style tokenizers can add tokens beyond vocab_size).
    config.vocab_size = len(tokenizer)
    for role in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            setattr(config, f"{role}_token_id", token_id)
    positions = max_positions(config)
    if positions:
        tokenizer.model_max_length = positions


def resolve_block_size(args: LanguageModelingArgs, config: PretrainedConfig) -> int:
    """block_size if set (error when the model cannot hold it), else min(max_seq_length, positions)."""
    positions = max_positions(config)
    if args.block_size > 0:
        if positions is not None and args.block_size > positions:
            raise ModelError(
                f"block_size {args.block_size} is larger than the model's {positions} positions",
                f"Set block_size to {positions} or less (or, from scratch, raise the position count in args.config)",
            )
        return args.block_size
    return min(args.max_seq_length, positions) if positions else args.max_seq_length


def check_vocab_fits(tokenizer_size: int, config: PretrainedConfig, source: str) -> None:
    if tokenizer_size > config.vocab_size:
        raise ModelError(
            f"The tokenizer has {tokenizer_size} tokens but the model from {source!r} has only {config.vocab_size} "
            "embeddings, so some token ids would crash the embedding lookup",
            "Use the tokenizer that was saved with the model (leave tokenizer_name unset), or train from scratch with "
            "this tokenizer",
        )


def forward_loss_sums(model, batch: dict, objective: str) -> dict:
    """Sums (not means) of the losses of one batch, in float32.

    "target_loss" is summed over the tokens that have a label (masked tokens, or every next token
    for CLM). ELECTRA adds "token_loss", the discriminator's loss summed over every real token, and
    its replaced-token counts (true/false positives/negatives over the real tokens).
    Summing lets the caller divide by the counts of the whole global batch, so a loss is
    token-weighted whatever the batch size or worker count, and a batch with no targets gives 0
    rather than NaN.
    """
    import torch
    import torch.nn.functional as F

    if objective == ELECTRA:
        # One call of the (DDP-wrapped) ElectraPair runs generator and discriminator, so DDP's hooks
        # see the whole step; it also returns the discriminator's replaced-token counts.
        documents = document_inputs(getattr(model, "module", model).discriminator.config, batch, causal=False)
        sums = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            sampling_uniform=batch.get("sampling_uniform"),
            target_positions=batch.get("target_positions"),
            **(
                {"document_mask": documents.get("attention_mask"), "position_ids": documents["position_ids"]}
                if documents
                else {}
            ),
        )
        if batch["n_input_tokens"] == 0:
            # A rank whose data ran out runs a placeholder batch (real-looking tokens, no labels) so
            # DDP's all-reduce happens; the discriminator would still score its tokens, so zero it
            # while keeping the graph (every parameter gets its zero gradient).
            sums = {key: value * 0 for key, value in sums.items()}
        return sums
    labels = batch["labels"]
    inputs = model_inputs(model, batch, objective)
    vocab_projection = masked_lm_vocab_projection(model) if objective == MLM else None
    if vocab_projection is not None:
        positions = batch["target_positions"]
        with _rows_selected(vocab_projection, positions):
            target_logits = model(**inputs).logits
        return {
            "target_loss": F.cross_entropy(
                target_logits.float(), labels.reshape(-1).index_select(0, positions), reduction="sum"
            )
        }
    if objective == CLM:
        # Each position predicts the next token. Shifting the labels, not the logits, keeps the
        # [tokens, vocab] logits contiguous: no copy of them (and of their gradient) per step.
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        output_layer = _causal_lm_output_layer(model)
        if output_layer is not None:
            with _loss_in_output_layer(output_layer, labels.reshape(-1)) as losses:
                model(**inputs)
            return {"target_loss": losses[0]}
    logits = model(**inputs).logits
    return {
        "target_loss": F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
    }


def model_inputs(model, batch: dict, objective: str) -> dict:
    """What a single (non-ELECTRA) model is called with: ids and the padding mask, or, for packed rows
    with document ids, per-document position ids and the block-diagonal 4D mask, or no mask for a
    padding-free attention (packing.document_inputs)."""
    config = getattr(model, "module", model).config
    documents = document_inputs(config, batch, causal=objective == CLM)
    if documents:
        return {"input_ids": batch["input_ids"], **documents}
    # A batch without padding (packed text blocks) goes without a mask: transformers would check the mask's
    # padding on the host (a GPU sync per forward), and without one SDPA keeps its mask-free kernel. A compiled
    # model keeps it: its graph traced without a mask recompiled at the second step (tests/test_compile.py).
    module = getattr(model, "module", model)
    compiled = getattr(module, "_compiled_call_impl", None) is not None
    unpadded = not compiled and batch["n_input_tokens"] == batch["input_ids"].numel()
    return {"input_ids": batch["input_ids"], "attention_mask": None if unpadded else batch["attention_mask"]}


# Masked LMs whose logits are the vocabulary projection's output as is (no reshaping or scaling after it).
_PROJECTION_LAST_MODEL_TYPES = frozenset({"bert", "roberta", "distilbert", "camembert", "xlm-roberta", "electra"})


def masked_lm_vocab_projection(model):
    """The output layer of a masked LM known to end with it, else None (DDP's wrapper looked through)."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in _PROJECTION_LAST_MODEL_TYPES:
        return None
    return inner.get_output_embeddings()


@contextlib.contextmanager
def _rows_selected(projection, positions: torch.Tensor):
    """Feed `projection` only the hidden states at `positions` (flat indices into [batch * seq]) during the block.

    The [tokens, vocab] logits are the largest tensor of a small masked LM's step, and only the
    ~15% masked positions have labels. A pre-hook on the output layer (not a second model) keeps
    the call inside the HF model's forward, so DDP sees it and the saved weights are unchanged.
    """
    # index_select with indices of a known count, unlike a boolean mask, does not wait for the device.
    handle = projection.register_forward_pre_hook(
        lambda _, inputs: (inputs[0].flatten(0, 1).index_select(0, positions),)
    )
    try:
        yield
    finally:
        handle.remove()


# Config attributes with which a causal LM scales or soft-caps its output layer's logits before returning them
# (Cohere's logit_scale, Granite's logits_scaling, Gemma 2's final_logit_softcapping, Falcon-H1's
# lm_head_multiplier, ...): the loss of the layer's output alone would not be the model's.
_LOGIT_TRANSFORMS = (
    "logit_scale",
    "logits_scaling",
    "final_logit_softcapping",
    "output_logit_soft_cap",
    "logits_soft_cap",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_mup_width_multiplier",
)


def _causal_lm_output_layer(model):
    """The output layer of a causal LM whose logits are that layer's output as is, else None: a Linear
    without bias, and a config with none of _LOGIT_TRANSFORMS (GPT-2, Llama, Qwen2 and Mistral qualify;
    Gemma 2, which soft-caps its logits, does not). linear_cross_entropy computes its loss."""
    from torch import nn

    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if config is None or any(
        getattr(part, name, None) is not None
        for part in (config, config.get_text_config())
        for name in _LOGIT_TRANSFORMS
    ):
        return None
    layer = inner.get_output_embeddings()
    return layer if isinstance(layer, nn.Linear) and layer.bias is None else None


@contextlib.contextmanager
def _loss_in_output_layer(output_layer, labels: torch.Tensor):
    """Inside the block, the model's output layer computes the loss of its input against `labels` (flat,
    shifted) into the yielded list, and logits for no token at all.

    The loss is computed in the layer's call, inside the HF model's own forward, like _rows_selected:
    DDP sees the step, and under FSDP the layer's weight is the whole, gathered one there.
    """
    from raylm.models.linear_cross_entropy import linear_cross_entropy_sum

    losses: list = []

    def loss_instead_of_logits(layer, inputs):
        hidden = inputs[0]
        losses.append(linear_cross_entropy_sum(hidden.flatten(0, 1), layer.weight, labels))
        return (hidden[..., :0, :],)

    handle = output_layer.register_forward_pre_hook(loss_instead_of_logits)
    try:
        yield losses
    finally:
        handle.remove()


def combine_loss(sums: dict, global_targets: int, global_inputs: int, token_loss_weight: float):
    """This batch's share of the global mean loss: target losses per global target, plus the weighted per-token loss."""
    loss = sums["target_loss"] / max(global_targets, 1)
    if "token_loss" in sums:
        loss = loss + token_loss_weight * sums["token_loss"] / max(global_inputs, 1)
    return loss


def save_trained(
    model, tokenizer, directory: str, state_dict: Optional[dict] = None, with_weights: bool = True
) -> None:
    """The model and its tokenizer in Hugging Face format (safetensors); an ELECTRA pair adds generator_model/
    and discriminator_model/.

    state_dict: the weights to write instead of the model's own (a sharded model's, gathered:
    parallelism.full_model_state). with_weights=False: all but the weights (a sharded checkpoint's).
    """
    if isinstance(model, ElectraPair):
        model.save_pretrained(directory, tokenizer, state_dict, with_weights)
    else:
        model.save_pretrained(directory, state_dict=state_dict) if with_weights else save_configs(model, directory)
        tokenizer.save_pretrained(directory)


def load_trained(objective: str, directory: str, trust_remote_code: bool = False):
    """The model that `save_trained` wrote to `directory`.

    trust_remote_code: the user's own setting (a model with custom code needs it here too, at resume and
    at the final load). ELECTRA pairs are transformers' own classes and never run a folder's code.
    """
    if reads_from_shards(directory):
        # An FSDP checkpoint without the Hugging Face export: the architecture from its configs, the weights from
        # its shards.
        if objective == ELECTRA:
            model = ElectraPair.from_pretrained(directory, with_weights=False)
        else:
            config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
            model = model_class(objective).from_config(config, trust_remote_code=trust_remote_code)
        load_sharded_weights(model, directory)
        return model
    if objective == ELECTRA:
        return ElectraPair.from_pretrained(directory)
    return model_class(objective).from_pretrained(directory, trust_remote_code=trust_remote_code)


def remote_code_sources(*objects) -> dict:
    """The folder code that the objects' classes came from: {"files": {path in the modules cache: source},
    "auto_classes": {class: Auto class}}.

    A model loaded with trust_remote_code is an instance of a class transformers imported from its
    modules cache on this machine; a Ray worker (maybe on another node) can unpickle and save it only
    once the same modules exist there (install_remote_code). Every .py file beside a module goes too,
    as transformers copies a model's relative imports next to it. The Auto class each class was
    registered for decides whether save_pretrained copies its code into the checkpoint.
    """
    files: dict[str, str] = {}
    auto_classes: dict[str, str] = {}
    for obj in objects:
        cls = type(obj)
        module = sys.modules.get(cls.__module__)
        if (
            module is None
            or not module.__name__.startswith("transformers_modules.")
            or not getattr(module, "__file__", None)
        ):
            continue
        if getattr(cls, "_auto_class", None):
            auto_classes[f"{cls.__module__}:{cls.__qualname__}"] = cls._auto_class
        folder = os.path.dirname(module.__file__)
        package = module.__name__.split(".")[:-1]
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    files["/".join([*package, name])] = f.read()
    return {"files": files, "auto_classes": auto_classes}


def install_remote_code(remote_code: Optional[dict]) -> None:
    """Write the driver's custom-code modules (remote_code_sources) into this machine's modules cache and
    import them."""
    if not remote_code or not remote_code["files"]:
        return
    from transformers.dynamic_module_utils import HF_MODULES_CACHE, init_hf_modules

    init_hf_modules()
    for relative, source in remote_code["files"].items():
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            package_init = os.path.join(HF_MODULES_CACHE, *parts[:depth], "__init__.py")
            os.makedirs(os.path.dirname(package_init), exist_ok=True)
            if not os.path.exists(package_init):
                open(package_init, "w").close()
        path = os.path.join(HF_MODULES_CACHE, *parts)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == source:
                    continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
    importlib.invalidate_caches()
    for qualified, auto_class in remote_code["auto_classes"].items():
        module_name, class_name = qualified.split(":")
        getattr(importlib.import_module(module_name), class_name).register_for_auto_class(auto_class)
