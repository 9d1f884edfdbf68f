"""ELECTRA: (model_name | generator_name + discriminator_name | nothing) + args -> `ElectraPair`, trained as one module.

The generator (`ElectraForMaskedLM`) fills in the masked tokens with samples from its softmax; the
discriminator (`ElectraForPreTraining`) reads the corrupted text and labels every token replaced or
original. `ElectraPair.forward` does both in one call, so DDP sees a single module, and returns the
loss sums and counts of `modeling.forward_loss_sums`. A saved pair is a folder Hugging Face can read:
the discriminator at the top level, plus generator_model/ and discriminator_model/ (the peer's layout).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AutoConfig, ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

from raylm.config import LanguageModelingArgs
from raylm.console import logger
from raylm.data.collators import IGNORE_INDEX
from raylm.data.tokenization import load_tokenizer
from raylm.errors import ModelError
from raylm.models.model_checks import check_local_model_folder, loading_weights, max_positions
from raylm.models.sharded_weights import load_sharded_weights, reads_from_shards, save_configs

GENERATOR_SUBDIR = "generator_model"
DISCRIMINATOR_SUBDIR = "discriminator_model"
PAIR_FILE = "electra_pair.json"
# Simple Transformers' model_name meaning "load generator_name and discriminator_name".
FROM_PARTS = "electra"
# In evaluation the discriminator's logits are also counted into fixed bins, one histogram for the
# replaced tokens and one for the originals, so that its AUC (how well it ranks replaced tokens above
# original ones, at every threshold) adds up over batches and workers like the other sums. Bins 0.05
# wide over [-10, 10] (logits beyond it fall in the end bins); a pair inside one bin counts as a tie.
LOGIT_BINS = 400
LOGIT_LIMIT = 10.0
REPLACED_HISTOGRAM, ORIGINAL_HISTOGRAM = "replaced_logit_histogram", "original_logit_histogram"


def sample_replacements(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token id per row of `logits` [n, vocab], drawn from softmax(logits) by inverting its CDF at `uniforms` [n].

    Given uniforms from the collator's counter-based hash, a sample depends only on the example,
    the position and the model, so repeated evaluations agree and a batch's samples do not depend
    on the batch size or the worker count.
    """
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    ids = torch.searchsorted(cdf, uniforms.float().unsqueeze(-1)).squeeze(-1)
    # float32 rounding can leave the last cdf entry just under a uniform close to 1.
    return ids.clamp_(max=logits.size(-1) - 1)


def logit_histograms(logits: torch.Tensor, replaced: torch.Tensor, original: torch.Tensor) -> dict:
    """Counts per logit bin (LOGIT_BINS) of the replaced and of the original tokens (boolean masks shaped like
    `logits`)."""
    bins = (
        ((logits.float().clamp(-LOGIT_LIMIT, LOGIT_LIMIT) + LOGIT_LIMIT) * (LOGIT_BINS / (2 * LOGIT_LIMIT)))
        .long()
        .clamp(max=LOGIT_BINS - 1)
        .reshape(-1)
    )
    # index_add_ over every token (weights 0 or 1) rather than indexing by the masks: no shape the data decides.
    empty = torch.zeros(LOGIT_BINS, dtype=torch.int64, device=logits.device)
    return {
        name: empty.index_add(0, bins, mask.reshape(-1).long())
        for name, mask in ((REPLACED_HISTOGRAM, replaced), (ORIGINAL_HISTOGRAM, original))
    }


def histogram_auc(replaced: list[float], original: list[float]) -> Optional[float]:
    """P(a replaced token's logit > an original token's) from the two histograms, ties counted half; None without
    both kinds."""
    n_replaced, n_original = sum(replaced), sum(original)
    if not n_replaced or not n_original:
        return None
    ranked, originals_below = 0.0, 0.0
    for replaced_count, original_count in zip(replaced, original):
        ranked += replaced_count * (originals_below + original_count / 2)
        originals_below += original_count
    return ranked / (n_replaced * n_original)


class ElectraPair(torch.nn.Module):
    """Generator + discriminator; forward(masked batch) -> loss sums and replaced-token counts."""

    def __init__(self, generator: ElectraForMaskedLM, discriminator: ElectraForPreTraining, tie_embeddings: bool):
        super().__init__()
        check_pair_configs(generator.config, discriminator.config, tie_embeddings)
        self.generator = generator
        self.discriminator = discriminator
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            # One token-embedding tensor, as in the paper (and Simple Transformers): the discriminator's
            # loss only reaches the embeddings of tokens in its input, while the generator's softmax
            # (its output layer is this same tensor) updates every row, so sharing gives the
            # discriminator embeddings trained on the whole vocabulary. The paper also ties the
            # position embeddings; we keep those, the token-type table and the embedding LayerNorm per
            # model, so a pair may have different position counts and each half stays a plain HF model.
            # The generator's table wins when two separately trained halves are paired.
            discriminator.set_input_embeddings(generator.get_input_embeddings())

    def shares_embeddings(self) -> bool:
        return self.generator.get_input_embeddings().weight is self.discriminator.get_input_embeddings().weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        sampling_uniform: Optional[torch.Tensor] = None,
        document_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        target_positions: Optional[torch.Tensor] = None,
    ) -> dict:
        """Sums over the batch (float32 losses, int64 counts), as `modeling.forward_loss_sums` documents.

        input_ids are already masked; labels hold the original ids at the masked positions (-100
        elsewhere). sampling_uniform [batch, length] drives the generator's samples (fresh random
        numbers when absent). document_mask and position_ids (packing.document_inputs) keep both
        models inside each document of a packed row (position_ids alone for a padding-free attention);
        attention_mask still tells real tokens from padding.
        target_positions: the flat indices of the masked positions, in order (the collator's; found from labels when
        absent).
        """
        # Indices of a known count, not boolean masks, throughout: a boolean mask's result has a shape only the
        # data tells, so each one waits for the device, and under torch_compile each one broke the step into another
        # graph.
        flat_labels = labels.reshape(-1)
        if target_positions is None:
            target_positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        originals = flat_labels.index_select(0, target_positions)
        if document_mask is not None:
            model_inputs = {"attention_mask": document_mask, "position_ids": position_ids}
        elif position_ids is not None:
            # Padding-free (packing.PADDING_FREE_ATTENTION): one row, documents told apart by their positions.
            model_inputs = {"position_ids": position_ids}
        else:
            model_inputs = {"attention_mask": attention_mask}
        hidden = self.generator.electra(input_ids=input_ids, **model_inputs).last_hidden_state
        # The MLM head runs on the masked positions only: [tokens, vocab] logits are the largest
        # tensor of a step, and ~85% of them would be thrown away.
        generator_logits = self.generator.get_output_embeddings()(
            self.generator.generator_predictions(hidden.flatten(0, 1).index_select(0, target_positions))
        )
        target_loss = F.cross_entropy(generator_logits.float(), originals, reduction="sum")

        with torch.no_grad():
            # Sampled, not argmax (the discriminator must see plausible mistakes), and no gradient
            # flows from the discriminator into the generator through the sampling (paper, section 2).
            uniforms = (
                sampling_uniform.reshape(-1).index_select(0, target_positions)
                if sampling_uniform is not None
                else torch.rand(originals.shape, device=input_ids.device)
            )
            sampled = sample_replacements(generator_logits.detach(), uniforms)
            corrupted = input_ids.reshape(-1).index_copy(0, target_positions, sampled).view_as(input_ids)
            # A sample equal to the original token is labelled original.
            is_replaced = (
                torch.zeros_like(flat_labels, dtype=torch.bool)
                .index_copy(0, target_positions, sampled != originals)
                .view_as(labels)
            )

        discriminator_logits = self.discriminator(input_ids=corrupted, **model_inputs).logits.float()
        # Padding is scored, then left out of every sum.
        is_real = attention_mask.bool()
        token_loss = torch.where(
            is_real,
            F.binary_cross_entropy_with_logits(discriminator_logits, is_replaced.float(), reduction="none"),
            0.0,
        ).sum()
        predicted = discriminator_logits.detach() > 0
        sums = {
            "target_loss": target_loss,
            "token_loss": token_loss,
            "true_positives": (is_real & predicted & is_replaced).sum(),
            "false_positives": (is_real & predicted & ~is_replaced).sum(),
            "false_negatives": (is_real & ~predicted & is_replaced).sum(),
            "true_negatives": (is_real & ~predicted & ~is_replaced).sum(),
        }
        if not self.training:
            sums.update(logit_histograms(discriminator_logits.detach(), is_real & is_replaced, is_real & ~is_replaced))
        return sums

    def save_pretrained(
        self, directory: str, tokenizer=None, state_dict: Optional[dict] = None, with_weights: bool = True
    ) -> None:
        """The discriminator at the top level (what ELECTRA pretraining is for: AutoModel and the task classes load it
        from there), each half in its own subfolder, and the tie setting in electra_pair.json.

        The discriminator's weights are stored twice (top level and discriminator_model/) so both
        the folder and its subfolders are complete HF models, as Simple Transformers users expect.
        state_dict: the pair's weights to write instead of its own (keys under generator. and discriminator.).
        with_weights=False: the configs and tokenizers alone (a sharded checkpoint's).
        """
        os.makedirs(directory, exist_ok=True)
        parts = {"": "discriminator", GENERATOR_SUBDIR: "generator", DISCRIMINATOR_SUBDIR: "discriminator"}
        for subdir, half in parts.items():
            half_state = (
                None
                if state_dict is None
                else {key[len(half) + 1 :]: value for key, value in state_dict.items() if key.startswith(half + ".")}
            )
            if with_weights:
                getattr(self, half).save_pretrained(os.path.join(directory, subdir), state_dict=half_state)
            else:
                save_configs(getattr(self, half), os.path.join(directory, subdir))
            if tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(directory, subdir))
        with open(os.path.join(directory, PAIR_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "generator": GENERATOR_SUBDIR,
                    "discriminator": DISCRIMINATOR_SUBDIR,
                    "tie_embeddings": self.tie_embeddings,
                },
                f,
                indent=2,
            )

    @classmethod
    def from_pretrained(
        cls, directory: str, tie_embeddings: Optional[bool] = None, with_weights: bool = True
    ) -> "ElectraPair":
        """The pair `save_pretrained` wrote; tie_embeddings None keeps the saved setting. with_weights=False: freshly
        initialised halves from the saved configs (a sharded checkpoint's weights are loaded into them after)."""
        with open(os.path.join(directory, PAIR_FILE), encoding="utf-8") as f:
            layout = json.load(f)
        halves = []
        for model_class, half in ((ElectraForMaskedLM, "generator"), (ElectraForPreTraining, "discriminator")):
            folder = os.path.join(directory, layout[half])
            halves.append(
                model_class.from_pretrained(folder)
                if with_weights
                else model_class(ElectraConfig.from_pretrained(folder))
            )
        return cls(*halves, layout["tie_embeddings"] if tie_embeddings is None else tie_embeddings)


@dataclass(frozen=True)
class ElectraSources:
    """Where the pair comes from: both halves' folders or hub names, or None for both (from scratch)."""

    generator: Optional[str]
    discriminator: Optional[str]
    tokenizer: Optional[str]  # where the tokenizer is, unless tokenizer_name says otherwise

    @property
    def from_scratch(self) -> bool:
        return self.generator is None


def resolve_sources(
    model_name: Optional[str], generator_name: Optional[str], discriminator_name: Optional[str]
) -> ElectraSources:
    """Check the combination of names (and that local folders exist) before anything is loaded."""
    if generator_name or discriminator_name:
        if not (generator_name and discriminator_name):
            missing = "discriminator_name" if generator_name else "generator_name"
            raise ModelError(
                f"ELECTRA got only one of generator_name and discriminator_name ({missing} is missing)",
                f"Pass {missing} too: the pair is loaded from both",
            )
        if model_name not in (None, FROM_PARTS):
            raise ModelError(
                f"model_name {model_name!r} and generator_name/discriminator_name both say where the ELECTRA model "
                "comes from",
                f"Pass model_name={FROM_PARTS!r} with generator_name and discriminator_name, or only model_name for a "
                "folder a raylm ELECTRA run saved",
            )
        check_local_model_folder(generator_name, "generator_name")
        check_local_model_folder(discriminator_name, "discriminator_name")
        return ElectraSources(generator_name, discriminator_name, discriminator_name)
    if model_name is None:
        return ElectraSources(None, None, None)
    if model_name == FROM_PARTS:
        raise ModelError(
            f"model_name={FROM_PARTS!r} loads a generator and a discriminator, but generator_name and "
            "discriminator_name are not set",
            "Pass generator_name=... and discriminator_name=... (folders or hub names), or model_name=None to train "
            "from scratch",
        )
    check_local_model_folder(model_name, "model_name")
    generator, discriminator = (
        os.path.join(model_name, GENERATOR_SUBDIR),
        os.path.join(model_name, DISCRIMINATOR_SUBDIR),
    )
    if not (os.path.isdir(generator) and os.path.isdir(discriminator)):
        raise ModelError(
            f"model_name {model_name!r} is not a saved ELECTRA pair (it has no {GENERATOR_SUBDIR}/ and "
            f"{DISCRIMINATOR_SUBDIR}/ subfolders)",
            f"Pass model_name={FROM_PARTS!r} with generator_name=... and discriminator_name=..., or the output_dir of "
            "an ELECTRA run",
        )
    for folder, role in ((generator, "generator"), (discriminator, "discriminator")):
        check_local_model_folder(folder, f"ELECTRA {role}")
    return ElectraSources(generator, discriminator, model_name)


def load_configs(sources: ElectraSources, args: LanguageModelingArgs, **kwargs) -> tuple[ElectraConfig, ElectraConfig]:
    """(generator config, discriminator config): from the sources, or ElectraConfig defaults + args.config + the
    role's overrides."""
    if args.config_name:
        raise ModelError(
            "config_name does not apply to ELECTRA, which has two configs",
            "Use generator_config and discriminator_config (from scratch), or generator_name and discriminator_name",
        )
    if sources.from_scratch:
        return (
            ElectraConfig(**{**args.config, **args.generator_config, **kwargs}),
            ElectraConfig(**{**args.config, **args.discriminator_config, **kwargs}),
        )
    return (
        _load_config(sources.generator, "generator_name", ElectraForMaskedLM, ElectraForPreTraining, **kwargs),
        _load_config(sources.discriminator, "discriminator_name", ElectraForPreTraining, ElectraForMaskedLM, **kwargs),
    )


def _load_config(source: str, role: str, expected: type, other_half: type, **kwargs) -> ElectraConfig:
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"Cannot load the {role} config from {source!r}: {str(err).splitlines()[0]}",
            "Use a folder written by save_pretrained, or a hub name reachable from this machine",
        ) from None
    if not isinstance(config, ElectraConfig):
        raise ModelError(
            f"The {role} {source!r} holds a {config.model_type!r} model, not an ELECTRA one",
            f"Point {role} to an ELECTRA {role.split('_')[0]}",
        )
    architectures = config.architectures or []
    if other_half.__name__ in architectures and expected.__name__ not in architectures:
        raise ModelError(
            f"The {role} {source!r} holds an {other_half.__name__}, the other half of the pair",
            "Swap generator_name and discriminator_name: the generator is an ElectraForMaskedLM, the discriminator an "
            "ElectraForPreTraining",
        )
    return config


def resolve_tie(
    sources: ElectraSources, generator_config: ElectraConfig, discriminator_config: ElectraConfig, tie_requested: bool
) -> bool:
    """Whether the pair shares its token embeddings: as asked, except for two pretrained halves whose tables differ in
    width.

    Those cannot share one tensor (Simple Transformers' own example pairs the small generator, 128
    wide, with the large discriminator, 1024 wide, and crashes at the first batch); they train with
    their own tables. From scratch the configs can be fixed, so check_pair_configs makes it an error.
    """
    if (
        sources.from_scratch
        or not tie_requested
        or generator_config.embedding_size == discriminator_config.embedding_size
    ):
        return tie_requested
    logger.warning(
        f"The generator's token embeddings are {generator_config.embedding_size} wide and the discriminator's "
        f"{discriminator_config.embedding_size}, so they cannot be one tensor: each half keeps its own "
        "(tie_generator_and_discriminator_embeddings has no effect for this pair)."
    )
    return False


def check_pair_configs(
    generator_config: ElectraConfig, discriminator_config: ElectraConfig, tie_embeddings: bool
) -> None:
    """The generator's samples are fed to the discriminator: same vocabulary, enough positions, tieable embeddings."""
    if generator_config.vocab_size != discriminator_config.vocab_size:
        raise ModelError(
            f"The generator's vocabulary ({generator_config.vocab_size} tokens) differs from the discriminator's "
            f"({discriminator_config.vocab_size}), so the tokens it samples would mean something else (or not exist) "
            "for the discriminator",
            "Pair a generator and a discriminator trained with the same tokenizer",
        )
    generator_positions, discriminator_positions = max_positions(generator_config), max_positions(discriminator_config)
    if generator_positions < discriminator_positions:
        raise ModelError(
            f"The generator has {generator_positions} positions but the discriminator {discriminator_positions}, and "
            "both read the same examples",
            "Give the generator at least as many positions (max_position_embeddings in generator_config)",
        )
    if tie_embeddings and generator_config.embedding_size != discriminator_config.embedding_size:
        raise ModelError(
            "tie_generator_and_discriminator_embeddings is True but the generator's embedding_size is "
            f"{generator_config.embedding_size} and the discriminator's {discriminator_config.embedding_size}",
            "Use the same embedding_size for both (the hidden sizes may differ), or set "
            "tie_generator_and_discriminator_embeddings=False",
        )


def check_same_vocabulary(sources: ElectraSources, tokenizer) -> None:
    """A local generator folder saved with a tokenizer must hold the pair's (equal vocabulary sizes can hide
    different tokens)."""
    generator = sources.generator
    has_tokenizer = generator is not None and any(
        os.path.isfile(os.path.join(generator, name)) for name in ("tokenizer.json", "vocab.txt")
    )
    if has_tokenizer and load_tokenizer(generator).get_vocab() != tokenizer.get_vocab():
        raise ModelError(
            f"The generator {generator!r} was saved with a different vocabulary from the tokenizer used for the "
            "discriminator",
            "Pair a generator and a discriminator trained with the same tokenizer (or set tokenizer_name to the one "
            "both use)",
        )


def build_pair(
    sources: ElectraSources,
    generator_config: ElectraConfig,
    discriminator_config: ElectraConfig,
    tie_embeddings: bool,
    **kwargs,
) -> ElectraPair:
    """Fresh halves from the configs (from scratch), or each half from its source (an FSDP checkpoint's halves
    from its shards)."""
    if sources.tokenizer and os.path.isdir(sources.tokenizer) and reads_from_shards(sources.tokenizer):
        pair = ElectraPair(
            ElectraForMaskedLM(generator_config), ElectraForPreTraining(discriminator_config), tie_embeddings
        )
        load_sharded_weights(pair, sources.tokenizer)
        return pair
    if sources.from_scratch:
        return ElectraPair(
            ElectraForMaskedLM(generator_config), ElectraForPreTraining(discriminator_config), tie_embeddings
        )
    halves = []
    for model_class, source, config in (
        (ElectraForMaskedLM, sources.generator, generator_config),
        (ElectraForPreTraining, sources.discriminator, discriminator_config),
    ):
        with loading_weights(source):
            halves.append(model_class.from_pretrained(source, config=config, **kwargs))
    return ElectraPair(*halves, tie_embeddings)
