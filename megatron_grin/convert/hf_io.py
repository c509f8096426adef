"""Read and write Hugging Face ``PhimoeForCausalLM`` directories (config, safetensors weights, tokenizer).

* :func:`grin_config_from_hf` turns a ``config.json`` into a :class:`GrinConfig`, refusing what
  megatron-grin cannot represent (another architecture, longrope/yarn RoPE scaling, tied embeddings,
  no biases, ...) with a message that says why.
* :func:`hf_config_from_grin` is the inverse, for export: every field GRIN-MoE / Phi-3.5-MoE set.
* :func:`hf_tensor_shapes` lists every HF tensor of a model shape, in file order, without weights.
* :class:`HFWeights` reads a safetensors checkpoint lazily, one tensor at a time, with plain file
  reads (no mmap, so resident memory stays at what is being converted), after checking up front
  that every shard exists and every tensor is present with the right shape.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from typing import Any, Iterator, Optional

import torch

from megatron_grin.config import ConfigError, GrinConfig
from megatron_grin.convert.hf_keys import HF_GLOBAL_KEYS, hf_config_dict, hf_keys
from megatron_grin.training.tokenizer import build_tokenizer

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: model_type values whose checkpoints are PhimoeForCausalLM-compatible. "grinmoe" is the remote-code
#: name microsoft/GRIN-MoE shipped with: same field names and tensor names (notes/grin-method.md §0).
MODEL_TYPES = ("phimoe", "grinmoe")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json")


class ConversionError(ValueError):
    """A checkpoint or directory that cannot be converted; the message says why and what to do."""


# --- config.json ----------------------------------------------------------------------------------------
def _rope_theta(hf: dict) -> float:
    """rope_theta from a 4.x (rope_theta / rope_scaling) or 5.x (rope_parameters) config; refuse scaling."""
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    for where, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConversionError(f"config.json: {where}={value!r} is not understood.")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind not in (None, "default"):
            raise ConversionError(
                f"config.json: {where} uses RoPE scaling {kind!r} (e.g. Phi-3.5-MoE's longrope for 128k "
                "context). megatron-grin implements plain RoPE only (GRIN-MoE: rope_theta 10000, 4k context); "
                "convert a checkpoint without rope scaling.")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        theta = 1e6  # PhimoeConfig default
    return float(theta)


def _require(hf: dict, key: str, expected: Any, default: Any, why: str) -> None:
    value = hf.get(key, default)
    if value != expected:
        raise ConversionError(f"config.json: {key}={value!r} is not supported ({why}); megatron-grin needs "
                              f"{key}={expected!r}.")


def grin_config_from_hf(hf: dict, **overrides: Any) -> GrinConfig:
    """GrinConfig of an HF Phimoe config.json dict (overrides: GrinConfig fields, e.g. the parallel layout)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type={model_type!r} (architectures {hf.get('architectures')}); only "
            "Phimoe checkpoints (model_type 'phimoe', PhimoeForCausalLM: GRIN-MoE, Phi-3.5-MoE) can be converted.")
    if model_type == "grinmoe":
        log.warning("model_type 'grinmoe' (GRIN-MoE remote code) is read as PhimoeForCausalLM: same tensors.")
    _require(hf, "hidden_act", "silu", "silu", "GRIN experts are SwiGLU with SiLU")
    _require(hf, "attention_bias", True, False, "GRIN has q/k/v/o biases")
    _require(hf, "lm_head_bias", True, False, "GRIN's output layer has a bias")
    _require(hf, "tie_word_embeddings", False, False, "GRIN's embeddings and lm_head are separate")
    _require(hf, "num_experts_per_tok", 2, 2, "the Phimoe sparsemixer router is hard-wired to top-2")
    theta = _rope_theta(hf)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("config.json: partial_rotary_factor != 1 is not supported (GRIN rotates full heads).")
    for key in ("attention_dropout", "hidden_dropout"):
        if hf.get(key, 0.0):
            log.warning("config.json: %s=%s is ignored (megatron-grin trains without dropout).", key, hf[key])
    try:
        heads = int(hf["num_attention_heads"])
        kv_heads = hf.get("num_key_value_heads") or heads
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
        fields = dict(
            num_layers=int(hf["num_hidden_layers"]), hidden_size=hidden,
            ffn_hidden_size=int(hf["intermediate_size"]), num_attention_heads=heads,
            num_query_groups=int(kv_heads), kv_channels=None if head_dim * heads == hidden else int(head_dim),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 131072)), rotary_base=theta,
            sliding_window=hf.get("sliding_window"), layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            num_experts=int(hf.get("num_local_experts", 16)), moe_router_topk=2,
            router_jitter_eps=float(hf.get("router_jitter_noise", 0.01)),
            input_jitter_eps=float(hf.get("input_jitter_noise", 0.0)),
            moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
            bf16=dtype.replace("torch.", "") == "bfloat16",
        )
    except KeyError as err:
        raise ConversionError(f"config.json lacks the required field {err.args[0]!r}.") from None
    fields.update(overrides)
    try:
        return GrinConfig(**fields).validate()
    except ConfigError as err:
        raise ConversionError(f"config.json describes a model megatron-grin cannot build: {err}") from None


def hf_config_from_grin(cfg: GrinConfig, dtype: torch.dtype, bos: Optional[int], eos: Optional[int],
                        pad: Optional[int] = None) -> dict:
    """config.json for the exported PhimoeForCausalLM (loads in transformers 4.46+ and 5.x)."""
    out = hf_config_dict(cfg, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                         torch_dtype=str(dtype).replace("torch.", ""))
    if cfg.kv_channels is None or cfg.kv_channels * cfg.num_attention_heads == cfg.hidden_size:
        out.pop("head_dim", None)  # transformers 4.x Phimoe derives it; keep the file minimal and unambiguous
    out["transformers_version"] = _transformers_version()
    return out


def generation_config(bos: Optional[int], eos: Optional[int], pad: Optional[int] = None) -> dict:
    out: dict[str, Any] = {"_from_model_config": True}
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None:
            out[key] = value
    out["transformers_version"] = _transformers_version()
    return out


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # transformers is a dependency, but the writer must not need it
        return "4.46.0"


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir!r} has no config.json: not a Hugging Face model directory.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --- tensor shapes -----------------------------------------------------------------------------------
def hf_tensor_shapes(cfg: GrinConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of this model shape -> its shape, in the order of :func:`hf_keys`."""
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
        "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "self_attn.o_proj.bias": (h,),
        "block_sparse_moe.gate.weight": (cfg.num_experts, h),
    }
    glob = dict(zip(HF_GLOBAL_KEYS, [(v, h), (h,), (h,), (v, h), (v,)]))
    expert = re.compile(r"^model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w(\d)\.weight$")
    out = {}
    for key in hf_keys(cfg):
        if key in glob:
            out[key] = glob[key]
        elif m := expert.match(key):
            out[key] = (h, f) if m.group(1) == "2" else (f, h)
        else:
            out[key] = per_layer[key.split(".", 3)[3]]
    return out


# --- safetensors reading -----------------------------------------------------------------------------
def read_safetensors_header(path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute start byte, end byte) of a safetensors file, checking its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{path} is truncated (no safetensors header).")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ConversionError(f"{path} is truncated or not a safetensors file (header length {n}).")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"cannot read safetensors file {path}: {err}") from None
    out = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        if base + end > size:
            raise ConversionError(f"{path} is truncated: tensor {name} ends at byte {base + end} of {size}.")
        out[name] = (_ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return out


_FUSED = re.compile(r"^(model\.layers\.\d+\.)mlp\.(router\.weight|experts\.gate_up_proj|experts\.down_proj)$")


class HFWeights:
    """Lazy access to the tensors of an HF Phimoe safetensors checkpoint under legacy (on-disk) names.

    transformers-5.x fused keys (``mlp.router``, ``mlp.experts.gate_up_proj`` / ``down_proj``) are
    presented under the legacy names, sliced per expert on read.
    """

    def __init__(self, hf_dir: str, cfg: GrinConfig):
        self.hf_dir = hf_dir
        self.cfg = cfg
        files = self._weight_files(hf_dir)
        self._where: dict[str, tuple] = {}  # legacy name -> (path, header entry, fused slice or None)
        for path, expected_keys in files.items():
            header = read_safetensors_header(path)
            if expected_keys is not None:
                absent = sorted(set(expected_keys) - set(header))
                if absent:
                    raise ConversionError(f"{INDEX_NAME} lists {absent[:5]} in {os.path.basename(path)}, but that "
                                          "file does not contain them: the index and the shards disagree.")
            for name, info in header.items():
                self._add(name, path, info)
        self._check(cfg)

    @staticmethod
    def _weight_files(hf_dir: str) -> dict[str, Optional[list[str]]]:
        index = os.path.join(hf_dir, INDEX_NAME)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map") or {}
            files: dict[str, list[str]] = {}
            for key, fname in weight_map.items():
                files.setdefault(os.path.join(hf_dir, fname), []).append(key)
            missing = sorted(os.path.basename(p) for p in files if not os.path.isfile(p))
            if missing:
                raise ConversionError(f"{hf_dir}: {INDEX_NAME} references shard(s) that do not exist: "
                                      f"{', '.join(missing)}. Re-download or re-copy the checkpoint.")
            if not files:
                raise ConversionError(f"{index} has an empty weight_map.")
            return files
        single = os.path.join(hf_dir, SINGLE_NAME)
        if os.path.isfile(single):
            return {single: None}
        if any(n.startswith("pytorch_model") for n in os.listdir(hf_dir)):
            raise ConversionError(f"{hf_dir} holds pytorch_model*.bin weights; only safetensors are read. Re-save "
                                  "with `model.save_pretrained(dir, safe_serialization=True)`.")
        raise ConversionError(f"{hf_dir} has no {SINGLE_NAME} or {INDEX_NAME}: no weights to convert.")

    def _add(self, name: str, path: str, info: tuple) -> None:
        m = _FUSED.match(name)
        if not m:
            self._where[name] = (path, info, None)
            return
        layer, what = m.groups()
        shape = info[1]
        if what == "router.weight":
            self._where[layer + "block_sparse_moe.gate.weight"] = (path, info, None)
        elif what == "experts.gate_up_proj":
            for e in range(shape[0]):
                for half, w in ((0, "w1"), (1, "w3")):
                    self._where[layer + f"block_sparse_moe.experts.{e}.{w}.weight"] = (path, info, (e, half))
        else:
            for e in range(shape[0]):
                self._where[layer + f"block_sparse_moe.experts.{e}.w2.weight"] = (path, info, (e, None))

    def shape(self, name: str) -> tuple[int, ...]:
        _, (dtype, shape, _, _), part = self._where[name]
        if part is None:
            return shape
        e, half = part
        rest = shape[1:]
        return rest if half is None else (rest[0] // 2, *rest[1:])

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][1][0]

    def _check(self, cfg: GrinConfig) -> None:
        expected = hf_tensor_shapes(cfg)
        missing = [k for k in expected if k not in self._where]
        if missing:
            raise ConversionError(f"{self.hf_dir}: {len(missing)} tensor(s) that config.json implies are missing, "
                                  f"e.g. {missing[:5]}. The shards are incomplete or belong to another model.")
        wrong = [(k, self.shape(k), s) for k, s in expected.items() if self.shape(k) != s]
        if wrong:
            k, got, want = wrong[0]
            raise ConversionError(f"{self.hf_dir}: {len(wrong)} tensor(s) have the wrong shape for config.json, e.g. "
                                  f"{k}: {got} in the file, {want} expected.")
        ignorable = re.compile(r"rotary_emb\.inv_freq$")
        extra = sorted(k for k in self._where if k not in expected and not ignorable.search(k))
        if extra:
            raise ConversionError(f"{self.hf_dir}: {len(extra)} unexpected tensor(s), e.g. {extra[:5]}; "
                                  "config.json does not describe these weights.")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        path, (dtype, shape, start, end), part = self._where[name]
        if part is not None:  # one expert of a fused [E, ...] tensor: read only its rows
            e, half = part
            per = (end - start) // shape[0]
            start, end, shape = start + e * per, start + (e + 1) * per, shape[1:]
        with open(path, "rb") as f:
            f.seek(start)
            buf = bytearray(end - start)
            if f.readinto(buf) != len(buf):
                raise ConversionError(f"{path} is truncated while reading {name}.")
        t = torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)
        if part is not None and part[1] is not None:
            t = t.chunk(2, dim=0)[part[1]]
        return t

    def keys(self) -> Iterator[str]:
        return iter(self._where)


# --- tokenizer -----------------------------------------------------------------------------------------------
def tokenizer_ids(tok_dir: str, vocab_size: int) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(bos, eos, pad) ids of a tokenizer spec (a local HF directory, byte, null:N), checking that it fits the
    model's vocabulary."""

    try:
        tok = build_tokenizer(tok_dir)
    except ValueError as err:
        raise ConversionError(f"--tokenizer: {err}") from None
    if tok.vocab_size > vocab_size:
        raise ConversionError(f"--tokenizer {tok_dir} has {tok.vocab_size} tokens but the model's vocabulary has "
                              f"{vocab_size} rows: ids past {vocab_size - 1} would have no embedding.")
    return tok.bos, tok.eod, tok.pad


def copy_tokenizer(tok_dir: str, out_dir: str) -> list[str]:
    copied = []
    for name in sorted(os.listdir(tok_dir)):
        if name in TOKENIZER_FILES or name.endswith(".tiktoken"):
            shutil.copy2(os.path.join(tok_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied
