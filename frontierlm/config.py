"""Engine configuration (validated on construction) and the normalized model configuration."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from frontierlm.compat import UNSUPPORTED_ENGINE_ARGS, strict_dataclass_init
from frontierlm.jsonfile import read_json_object

_DTYPES = {"auto": None, "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineConfig:
    model: str
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    tokenizer: str | None = None
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmark real shapes)
    structured_outputs_backend: str = "auto"  # "xgrammar", "guidance" (llguidance), or auto: per constraint
    # parallelism over torch.distributed (frontierlm/distributed): gloo on CPU, NCCL on CUDA
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts across the TP ranks instead of slices of each
    distributed_executor_backend: str | None = None  # "mp" (the only one: local processes, env rendezvous)
    nnodes: int = 1  # several nodes: rank 0's node (node_rank 0) serves, the others run workers
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (one node only)
    trust_remote_code: bool = False  # accepted for vLLM scripts; no model code is ever loaded from a checkpoint
    # True: no compiled / CUDA-graphed decode step (engine/fast_decode.py). None: eager on CPU, where inductor's
    # compile of the decode graphs took minutes on a 2-core machine (docs/benchmarks.md); fast path on CUDA.
    enforce_eager: bool | None = None
    # With the fast path on: True compiles (CPU) / captures (CUDA) the decode graphs while the engine starts, with
    # a progress bar and the seconds in the start-up report; False / None compiles each shape lazily on first use.
    # `frontierlm serve` passes True unless told otherwise (a server should not stall its first users).
    compile_decode_at_startup: bool | None = None
    # custom logits processors (classes or "module:Class" / "module.Class" names), vLLM v1's interface
    logits_processors: list = field(default_factory=list)
    speculative_config: dict | None = None  # frontierlm/spec/config.py: {"method", "num_speculative_tokens", ...}
    kv_transfer_config: dict | None = None  # frontierlm/kv_transfer/config.py: {"kv_connector", "kv_role", ...}
    # frontierlm/quant: None reads the checkpoint's quantization_config; "fp8" | "int8" | "int4" quantize a float
    # checkpoint while loading. kv_cache_dtype: "auto" (the model's dtype) or "fp8" / "fp8_e4m3" / "fp8_e5m2".
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    # a CSV file the engine writes one line per step to (engine/step_log.py), for the simulator's calibration
    step_log: str | None = None

    def __post_init__(self):
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            positive(name)
        if self.max_model_len is not None:
            positive("max_model_len")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.structured_outputs_backend not in ("auto", "xgrammar", "guidance"):
            raise ValueError("structured_outputs_backend must be 'auto', 'xgrammar' or 'guidance', got "
                             f"{self.structured_outputs_backend!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        from frontierlm.quant.config import check_quantization_arg
        from frontierlm.quant.kv_cache import kv_cache_torch_dtype

        check_quantization_arg(self.quantization)
        kv_cache_torch_dtype(self.kv_cache_dtype)
        if self.speculative_config is not None:
            from frontierlm.spec.config import SpeculativeConfig

            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.kv_transfer_config is not None:
            from frontierlm.kv_transfer.config import KVTransferConfig

            self.kv_transfer_config = KVTransferConfig.from_any(self.kv_transfer_config)
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes"):
            positive(name)
        for name in ("trust_remote_code", "enforce_eager", "enable_expert_parallel", "compile_decode_at_startup"):
            optional = name in ("enforce_eager", "compile_decode_at_startup")
            if not isinstance(getattr(self, name), bool) and not (optional and getattr(self, name) is None):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.logits_processors is None:
            self.logits_processors = []
        if not isinstance(self.logits_processors, (list, tuple)):
            raise ValueError(f"logits_processors must be a list of classes or 'module:Class' names, "
                             f"got {self.logits_processors!r}")
        self.logits_processors = list(self.logits_processors)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {self.device!r} is not a valid torch device: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available ({why}, torch "
                             f"{torch.__version__}); use --device cpu (or device='cpu')")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        check_attention_backend(dev)
        if self.world_size > 1 or self.nnodes > 1 or self.distributed_executor_backend is not None:
            from frontierlm.distributed.config import check_parallel_config

            check_parallel_config(self, dev)
        if self.enforce_eager is None:
            self.enforce_eager = dev.type == "cpu"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The requested dtype, or None for 'auto' (take the checkpoint's)."""
        return _DTYPES[self.dtype]


strict_dataclass_init(EngineConfig, UNSUPPORTED_ENGINE_ARGS)


def check_attention_backend(device: torch.device, is_mla: bool = False) -> None:
    """Refuse FRONTIERLM_ATTENTION_BACKEND values that cannot work here, saying what does."""
    choice = os.environ.get("FRONTIERLM_ATTENTION_BACKEND", "").strip().lower()
    if choice in ("", "torch"):
        return
    if choice != "triton":
        raise ValueError(f"FRONTIERLM_ATTENTION_BACKEND must be 'torch' or 'triton', got {choice!r}; "
                         "unset it for the default")
    if is_mla:
        raise ValueError("FRONTIERLM_ATTENTION_BACKEND=triton: the Triton backend has no MLA kernels yet; MLA "
                         "models (DeepSeek-V2/V3) run on the reference backend: unset it or set it to 'torch'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"FRONTIERLM_ATTENTION_BACKEND=triton needs a CUDA GPU (this run is on {device.type}); "
                         "unset it (or set 'torch') for the reference PyTorch backend, which runs everywhere")


def _resolve_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {value!r}")
    return _DTYPES[name]


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class ModelPathError(ValueError, FileNotFoundError):
    """A model directory that cannot be used: a ValueError (bad input) that is also a FileNotFoundError."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_dir(model, load_format: str = "auto") -> Path:
    """The model directory as a Path, or a ValueError saying in one line what is wrong with it and what to do:
    missing, a Hugging Face Hub id (nothing is downloaded), no config.json, missing or truncated weights."""
    if not isinstance(model, (str, os.PathLike)):
        raise ModelPathError(f"model must be a path to a model directory, got {type(model).__name__}")
    path = Path(model).expanduser()
    if not path.exists():
        if _HUB_ID.match(str(model)) and not str(model).startswith("."):
            raise ModelPathError(
                f"{str(model)!r} is not a local directory. If it is a Hugging Face Hub id: FrontierLM never "
                f"downloads models; get a local copy first, e.g. `hf download {model} --local-dir "
                f"./{Path(str(model)).name}` (pip install huggingface_hub), then pass that directory")
        raise ModelPathError(f"model directory {str(model)!r} does not exist")
    if not path.is_dir():
        raise ModelPathError(f"{str(model)!r} is a file; pass the model's directory (with config.json and weights)")
    if not (path / "config.json").is_file():
        raise ModelPathError(f"{str(model)!r} has no config.json (not a Hugging Face model directory)")
    if load_format != "dummy":
        _weight_files(path)
    return path


def _check_safetensors(file: Path) -> None:
    """A truncated download fails here with the file named, not deep inside the loader."""
    import json
    import struct

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelPathError(f"weights file {file} is truncated ({size} bytes): download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelPathError(f"weights file {file} is truncated or not safetensors (header of {n} bytes, file of "
                             f"{size}): download it again")
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ModelPathError(f"weights file {file} is not a valid safetensors file ({e}): download it again") from None
    if 8 + n + end > size:
        raise ModelPathError(f"weights file {file} is truncated ({size} of {8 + n + end} bytes): download it again")


def _weight_files(model_dir) -> list:
    """The safetensors files to load, checked to exist and to be whole (index first, then single/glob)."""
    import json

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelPathError(f"{index} is not a valid safetensors index (need a 'weight_map'): {e}") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelPathError(f"{index} names shards that are missing from {model_dir}: {', '.join(missing)}")
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise ModelPathError(f"no *.safetensors weights in {model_dir}" + (
            f" (found {', '.join(others[:3])}: only safetensors checkpoints are supported)" if others else
            " (only safetensors checkpoints are supported)"))
    for f in files:
        _check_safetensors(f)
    return files


class ModelConfig:
    """The HF config.json normalized to the few fields the engine needs; `hf_config` keeps everything else."""

    def __init__(self, model_dir: str, hf_config, dtype: torch.dtype, eos_token_ids: list[int],
                 bos_token_id: int | None, weight_files: list):
        self.model_dir = str(model_dir)
        self.hf_config = hf_config
        self.architecture: str = hf_config.architectures[0]
        self.dtype = dtype
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.weight_files = [str(f) for f in weight_files]
        c = hf_config
        self.vocab_size: int = c.vocab_size
        self.hidden_size: int = c.hidden_size
        self.num_layers: int = c.num_hidden_layers
        self.num_heads: int = c.num_attention_heads
        self.num_kv_heads: int = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim: int = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.max_position_embeddings: int = c.max_position_embeddings
        self.max_model_len: int = c.max_position_embeddings  # the engine lowers it to the limit in force
        self.tie_word_embeddings: bool = bool(getattr(c, "tie_word_embeddings", False))
        # DeepSeek MLA: the cache holds a latent of kv_lora_rank plus one shared rope key per token and layer.
        self.kv_lora_rank: int | None = getattr(c, "kv_lora_rank", None)
        self.qk_rope_head_dim: int | None = getattr(c, "qk_rope_head_dim", None) if self.kv_lora_rank else None
        self.quantization: str | None = None  # the engine's quantization argument (frontierlm/quant)
        self.kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype
        windows = [self.layer_sliding_window(i) for i in range(self.num_layers)]
        self.sliding_window: int | None = next((w for w in windows if w is not None), None)

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """Window of one layer: Qwen-style configs mark layers in `layer_types`, Mistral applies it to all."""
        window = getattr(self.hf_config, "sliding_window", None)
        layer_types = getattr(self.hf_config, "layer_types", None)
        if window is None or (layer_types is not None and layer_types[layer_idx] != "sliding_attention"):
            return None
        return int(window)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        elem = torch.empty((), dtype=dtype or self.kv_cache_dtype or self.dtype).element_size()
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * elem
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem

    def mha_kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """What the same model would cache per token with plain multi-head attention (for MLA: every head's
        decompressed key of qk_nope + qk_rope dims and value of v_head_dim)."""
        if not self.is_mla:
            return self.kv_cache_bytes_per_token(dtype)
        c, elem = self.hf_config, torch.empty((), dtype=dtype or self.dtype).element_size()
        return self.num_layers * self.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * elem

    def __repr__(self) -> str:
        return (f"ModelConfig({self.architecture}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"heads={self.num_heads}/{self.num_kv_heads}x{self.head_dim}, vocab={self.vocab_size}, "
                f"dtype={self.dtype}, max_model_len={self.max_model_len}, sliding_window={self.sliding_window})")

    @classmethod
    def from_pretrained(cls, model_dir, dtype: torch.dtype | str | None = None,
                        load_format: str = "auto") -> "ModelConfig":
        from frontierlm.models.registry import supported_architectures

        path = check_model_dir(model_dir, "dummy")  # weights are checked below, after the architecture
        cfg_file = path / "config.json"
        raw = read_json_object(cfg_file)
        archs = raw.get("architectures") or []
        supported = supported_architectures()
        arch = next((a for a in archs if a in supported), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or '(none given in config.json)'}; "
                             f"supported architectures: {', '.join(supported)}")
        files = [] if load_format == "dummy" else _weight_files(path)

        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad config
            raise ValueError(f"transformers could not parse {cfg_file}: {e}") from None
        hf_config.architectures = [arch]

        gen_file = path / "generation_config.json"
        gen = read_json_object(gen_file) if gen_file.is_file() else {}
        eos = list(dict.fromkeys(_as_id_list(raw.get("eos_token_id")) + _as_id_list(gen.get("eos_token_id"))))
        bos = raw.get("bos_token_id", gen.get("bos_token_id"))
        if bos is None:
            bos = gen.get("bos_token_id")

        resolved = _resolve_dtype(dtype)
        if resolved is None:
            resolved = _resolve_dtype(raw.get("dtype") or raw.get("torch_dtype")) or torch.float32
        return cls(path, hf_config, resolved, eos, bos, files)
