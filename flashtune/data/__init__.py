"""Tasks: E2E-format table-to-text (real CSV or generated), plain text; data files in chat / prompt-completion /
text formats; prompts, tokenization, packing, collation."""

from flashtune.data.dataset import (IGNORE_INDEX, Collator, bucket_batches, encode_prompt, example_length,
                                    head_training_prompts, make_lm_dataset, make_text_dataset)
from flashtune.data.files import read_text_file
from flashtune.data.formats import FORMATS, build_datasets, load_records
from flashtune.data.packing import check_packing, pack_examples
from flashtune.data.e2e import E2E_ATTRIBUTES, E2EExample, default_e2e_path, load_e2e_csv, parse_mr, split_by_mr
from flashtune.data.prompts import build_prompt, build_target, linearize_mr, stop_token_ids
from flashtune.data.synth import generate_e2e_style

__all__ = ["E2EExample", "load_e2e_csv", "generate_e2e_style", "split_by_mr", "make_lm_dataset",
           "make_text_dataset", "Collator", "encode_prompt", "build_prompt", "stop_token_ids", "parse_mr",
           "default_e2e_path", "example_length", "bucket_batches", "IGNORE_INDEX", "E2E_ATTRIBUTES",
           "build_target", "linearize_mr", "head_training_prompts", "load_records", "build_datasets", "FORMATS",
           "read_text_file", "pack_examples", "check_packing"]
