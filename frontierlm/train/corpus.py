"""Training text: a file, a folder, or a builtin corpus; a deterministic train/validation split by document
(by module for `python-stdlib`); token packing into fixed-length blocks and a resumable batch order.

The builtin corpora are assembled at run time from what ships with Python, so nothing is downloaded:
- `python-docs`: the pydoc topic pages (`pydoc_data.topics`) and the standard library's docstrings;
- `python-stdlib`: the standard library's own `.py` source, one document per file, without tests and without
  generated files (codec tables, `pydoc_data`, files that say they are generated).
"""
from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig
from pathlib import Path

import torch

PYTHON_DOCS = "python-docs"
PYTHON_STDLIB = "python-stdlib"
BUILTIN_CORPORA = (PYTHON_DOCS, PYTHON_STDLIB)
# A file whose first lines say this was written by a tool (gencodec's tables, pydoc_data, Tools/ output).
_GENERATED = re.compile(r"auto-?generated|generated (by|from|with)|do not edit", re.IGNORECASE)
# Folders of the standard library that hold tests, vendored packages or bytecode, not documentation.
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "idle_test", "tests", "test"}


def _is_test_path(name: str) -> bool:
    return name in _SKIP_DIRS or name.startswith("test_") or name.endswith("_test")


def _stdlib_files(root: Path) -> list[Path]:
    """Every .py file under `root` outside test folders, in sorted (deterministic) order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_test_path(d) and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames)
                     if f.endswith(".py") and not _is_test_path(f[:-3]))
    return files


def module_docstrings(path: Path) -> str | None:
    """The module, class and function docstrings of one source file (source order), or None if it fails to
    parse or has none."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None
    docs = [ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = [d for d in docs if d]
    return "\n\n".join(docs) if docs else None


@functools.lru_cache(maxsize=8)
def _python_docs(max_chars: int | None, stdlib_dir: str | None) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs, total = [], 0

    def add(text: str) -> bool:  # False once the cap is reached
        nonlocal total
        if max_chars is not None and total + len(text) >= max_chars:
            docs.append(text[:max_chars - total])
            return False
        docs.append(text)
        total += len(text)
        return True

    for name in sorted(topics):
        if topics[name].strip() and not add(topics[name]):
            return tuple(docs)
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):  # one document per module: its docstrings, joined
        text = module_docstrings(path)
        if text and not add(text):
            break
    return tuple(docs)


def python_docs(max_chars: int | None = None, stdlib_dir: str | None = None) -> list[str]:
    """The builtin corpus as documents: pydoc topics (by name), then one document per stdlib module."""
    return list(_python_docs(max_chars, stdlib_dir))


def _module_group(relative: Path) -> str:
    """The top-level module a stdlib file belongs to: `email/mime/text.py` -> `email`, `os.py` -> `os`."""
    return relative.parts[0].removesuffix(".py")


@functools.lru_cache(maxsize=4)
def _python_stdlib(stdlib_dir: str | None) -> tuple[tuple[str, str], ...]:
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in _stdlib_files(root):
        relative = path.relative_to(root)
        if relative.parts[0] == "pydoc_data":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and not _GENERATED.search(text[:3000]):
            docs.append((_module_group(relative), text))
    return tuple(docs)


def python_stdlib(stdlib_dir: str | None = None) -> list[tuple[str, str]]:
    """The builtin source corpus as (top-level module, file text) pairs, in sorted path order."""
    return list(_python_stdlib(stdlib_dir))


def _cap(docs: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[:max_chars - total])
        total += len(out[-1])
    return out


def load_corpus(corpus: str, max_chars: int | None = None) -> tuple[list[str], list[str] | None]:
    """(documents, groups): the documents of load_texts, and for `python-stdlib` each one's top-level module
    (so a split keeps a package's files together); groups is None for the other corpora."""
    if corpus != PYTHON_STDLIB:
        return load_texts(corpus, max_chars), None
    pairs = python_stdlib()
    docs = _cap([text for _, text in pairs], max_chars)
    return docs, [group for group, _ in pairs[:len(docs)]]


def load_texts(corpus: str, max_chars: int | None = None) -> list[str]:
    """Documents of `corpus`: `python-docs`; `python-stdlib`; a text file (its blank-line separated paragraphs);
    or a folder (one document per file, sorted, non-UTF-8 and hidden files skipped). At most `max_chars`
    characters."""
    if corpus == PYTHON_DOCS:
        return python_docs(max_chars)
    if corpus == PYTHON_STDLIB:
        return _cap([text for _, text in python_stdlib()], max_chars)
    path = Path(corpus)
    if path.is_file():
        docs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))]
    elif path.is_dir():
        docs = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in f.relative_to(path).parts):
                continue
            try:
                docs.append(f.read_text(encoding="utf-8").strip())
            except UnicodeDecodeError:
                continue
    else:
        raise FileNotFoundError(f"corpus {corpus!r} is neither {PYTHON_DOCS!r}, {PYTHON_STDLIB!r}, a text file "
                                "nor a folder")
    return _cap([d for d in docs if d], max_chars)


def split_documents(docs: list[str], val_fraction: float, seed: int = 0,
                    groups: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(train, validation): a seeded shuffle picks round(n * val_fraction) (at least 1) validation documents;
    both keep corpus order. The seed is fixed by default so runs with different training seeds share a
    validation set. With `groups` (one name per document) whole groups are held out, in shuffled order,
    until they cover the validation share: no group has documents on both sides."""
    if len(docs) < 2:
        raise ValueError(f"the corpus has {len(docs)} document(s); a train/validation split needs at least 2")
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    keys = groups if groups is not None else list(range(len(docs)))
    if len(keys) != len(docs):
        raise ValueError(f"{len(keys)} groups for {len(docs)} documents")
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    order = list(members)
    random.Random(seed).shuffle(order)
    val: set[int] = set()
    for key in order:
        if len(val) >= n_val or len(val) + len(members[key]) >= len(docs):
            break
        val.update(members[key])
    if not val:
        raise ValueError("the corpus has a single group; a split by group needs at least 2")
    return ([d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val])


def tokenize(tokenizer, docs: list[str]) -> list[list[int]]:
    return tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []


def pack_tokens(token_lists: list[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Documents joined with EOS after each, cut into [num_blocks, seq_len + 1] int64 blocks (inputs are a
    block's first seq_len tokens, labels its last seq_len); the remainder is dropped."""
    flat = [t for ids in token_lists for t in (*ids, eos_id)]
    n = len(flat) // (seq_len + 1)
    return torch.tensor(flat[:n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


class BlockBatches:
    """Micro-batch `index` of an endless stream of shuffled blocks (a fresh seeded permutation per epoch).

    A batch is a pure function of (seed, index), so a resumed run sees the batches it would have seen, and
    data-parallel ranks each take their slice of the same global batch.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        if blocks.shape[0] == 0:
            raise ValueError("no training blocks: the corpus is shorter than one sequence (seq_len + 1 tokens)")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.blocks.shape[0], generator=g)
        return self._perms[epoch]

    def __call__(self, index: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        n = self.blocks.shape[0]
        per_rank = self.batch_size // world_size
        start = index * self.batch_size + rank * per_rank
        rows = [int(self._perm(p // n)[p % n]) for p in range(start, start + per_rank)]
        return self.blocks[rows]
