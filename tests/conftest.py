import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Without a GPU the Triton kernels run in Triton's interpreter. The switch is read when a kernel is decorated,
# and transformers imports Hugging Face's `kernels` (which may import triton) with its models, so set it first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The released llm-jp tokenizer, for the compatibility tests: place it at ../shared/tokenizers/ beside the
# repository. Without it those tests skip, except in CI (CI=true), where a missing file is a failure.
LLMJP_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llm-jp-tokenizer-100k.ver3.0b1.model"


@pytest.fixture
def llmjp_tokenizer():
    if not LLMJP_TOKENIZER.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{LLMJP_TOKENIZER} is missing (CI runs every tokenizer compatibility test)")
        pytest.skip(f"{LLMJP_TOKENIZER} is not here")
    return LLMJP_TOKENIZER


def write_jsonl(path, rows):
    """A jsonl file of `rows`: dicts as JSON records, strings as raw lines (blank or malformed ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path
