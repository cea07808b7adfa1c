"""Byte-level BPE tokenizer training (`frontierlm train-tokenizer`), saved the way transformers loads it:
tokenizer.json + tokenizer_config.json with special tokens and a chat template."""
from __future__ import annotations

from pathlib import Path

from frontierlm.logger import init_logger

logger = init_logger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]
END_OF_TURN = "<|end|>"
# Each turn is <|role|>content<|end|>; the model learns to close its reply with <|end|>, which the exported
# generation_config lists as a stop token next to </s>.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_BYTE_ALPHABET = 256
# Pre-tokenization cuts text into pieces that BPE merges within, never across.
#   text: GPT-2's byte-level rule (words with their leading space, digit runs, punctuation runs, whitespace).
#   code: a newline with the indentation after it is one piece, so "\n" + 4k spaces become single tokens and a
#   line's depth costs one token; identifiers keep their underscores and digits; numbers split in threes;
#   spaces between tokens are their own runs.
PRETOKENIZERS = ("text", "code")
_CODE_PIECES = (r"\n[ \t]*"
                r"| ?[\p{L}_][\p{L}\p{N}_]*"
                r"| ?\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}_]+"
                r"|[ \t]+(?![^ \t])"
                r"|\s")


def pretokenizer_for(corpus: str, choice: str = "auto") -> str:
    """The pre-tokenizer a corpus gets: `choice`, or for auto code for the stdlib source and text otherwise."""
    if choice != "auto":
        return choice
    from frontierlm.train.corpus import PYTHON_STDLIB

    return "code" if corpus == PYTHON_STDLIB else "text"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path | None = None,
                    pretokenizer: str = "text"):
    """A byte-level BPE PreTrainedTokenizerFast trained on `texts` (saved to `out_dir` when given);
    `pretokenizer` is one of PRETOKENIZERS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    smallest = len(SPECIAL_TOKENS) + _BYTE_ALPHABET
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < smallest:
        raise ValueError(f"vocab_size must be an integer >= {smallest} (special tokens + 256 bytes), "
                         f"got {vocab_size!r}")
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    if pretokenizer not in PRETOKENIZERS:
        raise ValueError(f"pretokenizer must be one of {', '.join(PRETOKENIZERS)}, got {pretokenizer!r}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    if pretokenizer == "code":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CODE_PIECES), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, additional_special_tokens=ROLE_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
        logger.info("tokenizer with %d tokens written to %s", len(fast), out_dir)
    return fast


def load_tokenizer(path: str | Path):
    """The transformers tokenizer saved in `path` (local files only)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"tokenizer directory {str(path)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types; name the directory and the cause
        raise ValueError(f"could not load the tokenizer in {path}: {e}") from e


def stop_token_ids(tokenizer) -> list[int]:
    """EOS, plus the end-of-turn marker when the vocabulary has one (generation stops at either)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids:
        ids.append(end)
    return ids
