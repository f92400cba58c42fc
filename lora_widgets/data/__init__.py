"""Data: built-in corpora, text packed into blocks, instruction rows rendered with a chat template.

===================  ========================================================================================
``sources``          the door: what a source is (a corpus name, a file, texts, rows, a dataset, a tensor, prepared
                     data), decided once by ``classify_source``, its content read and its errors raised there
``prepared``         data already prepared: ``DataSplit`` (blocks), ``Examples``, ``PaddedBatch``, ``RunData``
``corpora``          the built-in offline corpora (stdlib code, the Language Reference prose, python-instruct)
``text``             plain text -> token blocks: reading files, splitting by document, packing
``passages``         which documents share a long passage (grouped so a split keeps them on one side)
``split``            the validation rule: whole documents (or examples) held out, seeded; the fallback
``rows``             instruction rows in TRL's formats (messages, prompt/completion, text; ShareGPT, Alpaca)
``sft``              rows -> token ids with the loss mask on the answers (as TRL's ``SFTTrainer``)
``sft_batches``      padded, length-grouped batches and the masked loss normalised per optimizer step
``sft_eval``         answer loss and the share of replies that end their turn
``instruct_corpus``  how the ``python-instruct`` set is built from the standard library's own docs
===================  ========================================================================================
"""

from __future__ import annotations

from lora_widgets.data.corpora import (
    CorpusInfo,
    list_corpora,
    load_corpus,
    load_heldout_code,
    read_instructions,
)
from lora_widgets.data.passages import PassageOverlap, passage_groups, passage_overlap
from lora_widgets.data.prepared import DataSplit, Examples, RunData
from lora_widgets.data.rows import load_rows, normalize_rows
from lora_widgets.data.sft import SFTStats, prepare_sft
from lora_widgets.data.sft_batches import collate, iter_batches, masked_lm_loss
from lora_widgets.data.sft_eval import answer_loss, end_of_turn_share
from lora_widgets.data.sources import Source, classify_source
from lora_widgets.data.split import split_groups
from lora_widgets.data.text import load_texts, pack_blocks, prepare_data

__all__ = [
    "CorpusInfo",
    "DataSplit",
    "Examples",
    "PassageOverlap",
    "RunData",
    "SFTStats",
    "Source",
    "answer_loss",
    "classify_source",
    "collate",
    "end_of_turn_share",
    "iter_batches",
    "list_corpora",
    "load_corpus",
    "load_heldout_code",
    "load_rows",
    "load_texts",
    "masked_lm_loss",
    "normalize_rows",
    "pack_blocks",
    "passage_groups",
    "passage_overlap",
    "prepare_data",
    "prepare_sft",
    "read_instructions",
    "split_groups",
]
