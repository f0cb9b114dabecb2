"""Packed checkpoints: quantized weights stored at their true bit widths in one safetensors file.

A quantized layer at ``b`` bits costs ``ceil(n·b/8)`` bytes of codes plus its learned scale; everything
else (BN, biases, neuron constants, unquantized layers) is stored as float32. Loading parses JSON and
raw tensors only (no pickle, no code) and rebuilds a model whose outputs are bit-identical to the saved one.

File layout (format ``hq_ptq.packed``, version 1)::

    tensors   codes           uint8   every layer's packed codes, layer after layer (byte aligned)
              state.<dtype>   1-D     the rest of the state_dict (minus quantized weights), concatenated
    metadata  format, format_version, plan (Plan.to_dict JSON), model_config (zoo models only),
              layers (name, scheme, bits, encoding, shape), state ({dtype: [[key, shape], ...]}),
              sha256 (of the whole file with this value blanked to zeros)

Tensors are concatenated per dtype rather than stored one safetensors entry per state key because each
entry costs ~100 header bytes: a small spiking transformer has ~200 keys (many scalar neuron constants),
which would add 10-20 % to the file.

Codes: uniform ``c ∈ ±(2^(b-1)-1)`` is stored offset (``c + 2^(b-1)``); power-of-two codes are stored as
1 sign bit + (b-1) exponent-index bits, exactly the scheme's sign+exponent layout. Bits are packed
LSB-first into a continuous little-endian bit stream (:func:`pack_bits`).

>>> path = save(qmodel, "model.hqp.safetensors")
>>> model = load(path)                       # zoo model: rebuilt from its config
>>> model = load(path, model=MyNet())        # any other model: pass a fresh float skeleton
>>> inspect(path)["compression"]["file"]
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from hq_ptq.attention import split_attention
from hq_ptq.compression import file_compression, fp32_bytes, weight_compression
from hq_ptq.errors import first_line
from hq_ptq.files import atomic_write
from hq_ptq.plan import Plan
from hq_ptq.schemes import SCHEMES, channel_axis, dequantize, weight_codes
from hq_ptq.state import apply_plan, get_plan
from hq_ptq.swap import layer_quant, quant_layers

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "inspect",
    "load",
    "pack_bits",
    "save",
    "unpack_bits",
]

log = logging.getLogger(__name__)

FORMAT = "hq_ptq.packed"
FORMAT_VERSION = 1

_CHECKSUM_KEY = "sha256"
_BLANK = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")

# Only these dtypes may appear in a file; names are looked up here, never with getattr on file content.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# scheme code format -> on-disk encoding of its signed codes
_ENCODING = {"int": "offset", "pot": "sign_magnitude"}


class CheckpointError(ValueError):
    """A packed checkpoint cannot be read: not a file, wrong format or version, corrupt, or wrong model."""


# ---------------------------------------------------------------------------------------------
# bit packing


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def pack_bits(codes_uint8: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit codes into ``ceil(n·bits/8)`` bytes (LSB-first bit stream).

    Args:
        codes_uint8: uint8 tensor of any shape (flattened in row-major order), every value < 2^bits.
        bits: code width, 1..8.

    Returns:
        1-D uint8 tensor; unused high bits of the last byte are zero.

    Raises:
        ValueError: bits outside 1..8, a non-uint8 input, or a code that does not fit in ``bits``.
    """
    bits = _check_bits(bits)
    if codes_uint8.dtype != torch.uint8:
        raise ValueError(f"pack_bits needs uint8 codes, got {codes_uint8.dtype}; offset signed codes first")
    flat = codes_uint8.detach().cpu().reshape(-1).numpy()
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits (max {(1 << bits) - 1})")
    # (n, bits) bit planes, least significant first, then one continuous little-endian stream
    planes = np.unpackbits(flat[:, None], axis=1, count=bits, bitorder="little")
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` ``bits``-bit codes of ``packed`` as a 1-D uint8 tensor.

    Raises:
        ValueError: bits outside 1..8, negative ``n``, or ``packed`` not exactly ``ceil(n·bits/8)``
            uint8 bytes.
    """
    bits = _check_bits(bits)
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    n = int(n)
    need = (n * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.numel() != need:
        raise ValueError(
            f"{n} codes of {bits} bits need {need} uint8 bytes, got {packed.numel()} {packed.dtype}"
        )
    stream = np.unpackbits(packed.detach().cpu().reshape(-1).numpy(), count=n * bits, bitorder="little")
    return torch.from_numpy(np.packbits(stream.reshape(n, bits), axis=1, bitorder="little").reshape(n))


def _encode(codes: Tensor, bits: int, encoding: str) -> Tensor:
    c = codes.to(torch.int16).reshape(-1)
    if encoding == "offset":
        u = c + (1 << (bits - 1))
    else:  # sign_magnitude
        u = torch.where(c < 0, (1 << (bits - 1)) - c, c)
    return u.to(torch.uint8)


def _decode(u: Tensor, bits: int, encoding: str) -> Tensor:
    v = u.to(torch.int16)
    if encoding == "offset":
        c = v - (1 << (bits - 1))
    else:
        mag = v & ((1 << (bits - 1)) - 1)
        c = torch.where(v >> (bits - 1) != 0, -mag, mag)
    return c.to(torch.int8)


# ---------------------------------------------------------------------------------------------
# save


def _module_aliases(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[str]]:
    # a module registered under several names appears under each in the state_dict
    ids = {id(m): n for n, m in layers.items()}
    out: dict[str, list[str]] = {n: [] for n in layers}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in ids:
            out[ids[id(module)]].append(name)
    return out


def _storable(t: Tensor) -> Tensor:
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.to(torch.float32)  # float16/bfloat16 widen exactly; float64 stays to keep reloads exact
    if t.dtype not in _DTYPE_NAMES:
        raise ValueError(f"state tensor of dtype {t.dtype} cannot be packed; supported: {', '.join(_DTYPES)}")
    return t.contiguous()


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a quantized model as a packed checkpoint (atomically) and return its path.

    Every hq_ptq-quantized layer's weight is stored as its integer codes at the layer's bit width
    plus its learned scale; all other state as float32 (integer buffers keep their dtype).

    Raises:
        ValueError: the model has no hq_ptq-quantized layers, or state of an unsupported dtype.
    """
    plan = get_plan(model)  # raises a readable ValueError for an unquantized model
    layers = quant_layers(model)
    aliases = _module_aliases(model, layers)
    weight_keys = {f"{a}.weight" for names in aliases.values() for a in names}

    layer_meta, packed = [], []
    for name, layer in layers.items():
        scheme, bits = layer_quant(layer)
        encoding = _ENCODING[SCHEMES[scheme].codes]
        codes, _ = weight_codes(layer)
        packed.append(pack_bits(_encode(codes, bits, encoding), bits))
        layer_meta.append(
            {"name": name, "scheme": scheme, "bits": bits, "encoding": encoding, "shape": list(codes.shape)}
        )
        if len(aliases[name]) > 1:  # a layer registered under several names (inspect's FP32 size counts each)
            layer_meta[-1]["aliases"] = aliases[name]

    by_dtype: dict[str, list[Tensor]] = {}
    index: dict[str, list[list[Any]]] = {}
    for key, value in model.state_dict().items():
        if key in weight_keys:
            continue
        t = _storable(value)
        dname = _DTYPE_NAMES[t.dtype]
        by_dtype.setdefault(dname, []).append(t.reshape(-1))
        index.setdefault(dname, []).append([key, list(t.shape)])

    tensors = {"codes": torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)}
    tensors.update({f"state.{d}": torch.cat(ts) for d, ts in by_dtype.items()})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "plan": _json(plan.to_dict(), "the plan"),
        "layers": json.dumps(layer_meta, separators=(",", ":")),
        "state": json.dumps(index, separators=(",", ":")),
        _CHECKSUM_KEY: _BLANK,
    }
    config = getattr(model, "hq_config", None)
    if config is not None:
        metadata["model_config"] = _json(config, "model.hq_config")

    data = st_save(tensors, metadata=metadata)
    end = 8 + int.from_bytes(data[:8], "little")
    header, needle = data[8:end], _needle(_BLANK)
    if header.count(needle) != 1:  # cannot happen with our own keys; guards the blanking scheme
        raise RuntimeError("checksum placeholder is not unique in the safetensors header")
    digest = hashlib.sha256(data).hexdigest()
    # same length, so the header size and every data offset stay valid
    data = data[:8] + header.replace(needle, _needle(digest)) + data[end:]
    out = atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    log.info("saved packed checkpoint %s (%d bytes, %d quantized layers)", out, len(data), len(layers))
    return out


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON serialisable ({err}); keep plan meta to plain data") from None


def _needle(hexdigest: str) -> bytes:
    return f'"{_CHECKSUM_KEY}":"{hexdigest}"'.encode()


# ---------------------------------------------------------------------------------------------
# read and verify


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor], int]:
    """Verified ``(metadata, tensors, file_size)``; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; pass the path written by hq_ptq.save")
    data = path.read_bytes()
    what = f"{path} is not an hq_ptq packed checkpoint"
    if len(data) < 8:
        raise CheckpointError(f"{what} ({len(data)} bytes; too short for safetensors)")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > len(data) - 8:
        raise CheckpointError(f"{what} (bad safetensors header length {n} for a {len(data)}-byte file)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{what} (unreadable safetensors header)") from None
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
        raise CheckpointError(f"{what} (no hq_ptq metadata)")
    if md.get("format") != FORMAT:
        is_float = md.get("format") == "hq_ptq.float"
        hint = "; it is a float checkpoint, use hq_ptq.checkpoint.load_float" if is_float else ""
        raise CheckpointError(f"{what} (format={md.get('format')!r}){hint}")
    if md.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has unsupported format version {md.get('format_version')!r}; "
            f"this hq_ptq reads version {FORMAT_VERSION}"
        )
    digest = md.get(_CHECKSUM_KEY, "")
    if not _HEX64.fullmatch(digest) or data[8 : 8 + n].count(_needle(digest)) != 1:
        raise CheckpointError(f"{path}: checksum missing or malformed; the file is corrupt")
    blanked = data[:8] + data[8 : 8 + n].replace(_needle(digest), _needle(_BLANK)) + data[8 + n :]
    if not hmac.compare_digest(hashlib.sha256(blanked).hexdigest(), digest):
        raise CheckpointError(f"{path}: checksum mismatch; the file is truncated or altered")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: corrupt tensor data ({first_line(err)})") from None
    return md, tensors, len(data)


def _parse(path: str | os.PathLike, md: dict[str, str], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Decode and cross-check the metadata; returns plan, layers (with codes) and the flat state."""
    try:
        plan = Plan.from_dict(json.loads(md["plan"]))
        layers = json.loads(md["layers"])
        index = json.loads(md["state"])
        config = json.loads(md["model_config"]) if "model_config" in md else None
        if "model_config" in md and not (isinstance(config, dict) and isinstance(config.get("name"), str)):
            raise ValueError("model_config has no model name")
        if [(c.name, c.scheme, c.bits) for c in plan.layers] != [
            (d["name"], d["scheme"], d["bits"]) for d in layers
        ]:
            raise ValueError("plan and packed layers disagree")
        codes = tensors["codes"]
        offset = 0
        out_layers = []
        for d in layers:
            bits, shape, enc = int(d["bits"]), [int(s) for s in d["shape"]], d["encoding"]
            if d["scheme"] not in SCHEMES or bits not in SCHEMES[d["scheme"]].bits:
                raise ValueError(f"unknown scheme/bits {d['scheme']}/{bits}")
            if enc != _ENCODING[SCHEMES[d["scheme"]].codes] or min(shape, default=1) < 0:
                raise ValueError(f"bad encoding or shape for layer {d['name']}")
            count = math.prod(shape)
            nbytes = (count * bits + 7) // 8
            chunk = codes[offset : offset + nbytes]
            offset += nbytes
            out_layers.append({**d, "bits": bits, "shape": shape, "packed": chunk, "params": count})
        if offset != codes.numel() or codes.dtype != torch.uint8:
            raise ValueError("packed code bytes do not match the layer table")
        state: dict[str, Tensor] = {}
        if set(tensors) != {"codes"} | {f"state.{d}" for d in index}:
            raise ValueError("tensor blobs do not match the state index")
        for dname, entries in index.items():
            blob, pos = tensors[f"state.{dname}"], 0
            if blob.dtype != _DTYPES[dname]:
                raise ValueError(f"blob state.{dname} has dtype {blob.dtype}")
            for key, shape in entries:
                count = math.prod(int(s) for s in shape)
                if not isinstance(key, str) or key in state or pos + count > blob.numel():
                    raise ValueError(f"bad state entry {key!r}")
                state[key] = blob[pos : pos + count].reshape([int(s) for s in shape])
                pos += count
            if pos != blob.numel():
                raise ValueError(f"state.{dname} has {blob.numel() - pos} unindexed elements")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, RecursionError) as err:
        msg = first_line(err)
        raise CheckpointError(f"{path}: malformed hq_ptq metadata ({msg})") from None
    return {"plan": plan, "layers": out_layers, "state": state, "config": config}


# ---------------------------------------------------------------------------------------------
# load


def _build(path: str | os.PathLike, config: dict[str, Any] | None, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    if config is None:
        raise CheckpointError(
            f"{path} was saved from a non-zoo model; pass load(path, model=<fresh float model of that "
            "architecture>)"
        )
    from hq_ptq.models import build_model

    kwargs = dict(config)
    name = kwargs.pop("name")
    try:
        return build_model(name, **kwargs)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot rebuild model {name!r} ({first_line(err)})") from None


def _mismatch(path: str | os.PathLike, what: str, names: list[str]) -> CheckpointError:
    shown = ", ".join(sorted(names)[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    return CheckpointError(f"{path} does not match the model: {what} {shown}; pass the same architecture")


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    map_location: str | torch.device | None = None,
) -> nn.Module:
    """Rebuild a quantized model from a packed checkpoint, in eval mode, bit-identical to the saved one.

    Args:
        path: a file written by :func:`save`.
        model: a freshly constructed float model of the saved architecture; required when the saved
            model was not built by ``hq_ptq.models.build_model``, otherwise the zoo config rebuilds it.
        map_location: where the returned model lives: "cpu", "cuda", "cuda:N", "auto" (cuda when
            available) or a ``torch.device``. None (the default): as before, a rebuilt zoo model on the
            CPU, a ``model`` passed in on the device it came on. The codes are decoded and checked on the
            CPU either way, then the model is moved.

    Raises:
        CheckpointError: not a file, not an hq_ptq packed checkpoint, unsupported version, checksum
            mismatch (truncated or altered file), or a model whose layers do not match.
        ValueError: a ``map_location`` that is not a device here (one line).
    """
    from hq_ptq.devices import model_device, resolve_device

    device = None if map_location is None else resolve_device(map_location, what="map_location")
    md, tensors, _ = _read(path)
    parsed = _parse(path, md, tensors)
    plan: Plan = parsed["plan"]
    model = _build(path, parsed["config"], model)
    if device is None:
        device = model_device(model)  # a model passed in goes back where it came from
    model.cpu()

    # an attention split when the file was made (the plan names its projections); a file from before
    # hq_ptq split attention kept it float, and its state loads into torch's module as it is
    split_attention(model, {c.name for c in plan.layers}.__contains__)
    modules = dict(model.named_modules())
    absent = [c.name for c in plan.layers if c.name not in modules]
    if absent:
        raise _mismatch(path, "it has no layers", absent)
    try:
        apply_plan(model, plan)
    except ValueError as err:  # e.g. a plan layer that is not a Conv/Linear in this model
        raise CheckpointError(f"{path} does not match the model: {first_line(err)}") from None
    layers = quant_layers(model)
    extra = sorted(set(layers) - set(plan.by_name))
    if extra:
        raise _mismatch(path, "the model has quantized layers the file lacks:", extra)

    aliases = _module_aliases(model, layers)
    weight_keys = {f"{a}.weight" for names in aliases.values() for a in names}
    try:
        missing, unexpected = model.load_state_dict(parsed["state"], strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = str(err).splitlines()[-1].strip()
        raise CheckpointError(f"{path} does not match the model: {detail}") from None
    if unexpected:
        raise _mismatch(path, "the file has state the model lacks:", list(unexpected))
    missing = [k for k in missing if k not in weight_keys]
    if missing:
        raise _mismatch(path, "the file lacks state of", missing)

    for entry in parsed["layers"]:
        name, bits, shape = entry["name"], entry["bits"], entry["shape"]
        layer = layers[name]
        if list(layer.weight.shape) != shape:
            raise _mismatch(path, f"weight shape {shape} vs {list(layer.weight.shape)} of", [name])
        codes = _decode(unpack_bits(entry["packed"], bits, entry["params"]), bits, entry["encoding"])
        codes = codes.reshape(shape)
        # the step the quantizer uses depends only on the (just loaded) scale, not on the weight
        _, scale = weight_codes(layer)
        try:
            w = dequantize(codes, scale, entry["scheme"], entry["bits"], channel_axis(layer))
        except ValueError as err:
            raise CheckpointError(f"{path}: layer {entry['name']}: {err}") from None
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.dtype))
        # the dequantized weight must be a fixed point of the quantizer, else outputs would drift
        if not torch.equal(weight_codes(layer)[0], codes):
            raise CheckpointError(f"{path}: layer {entry['name']} does not re-quantize to its stored codes")
    model.to(device)
    model.eval()
    log.info("loaded packed checkpoint %s (%d quantized layers) on %s", path, len(layers), device)
    return model


# ---------------------------------------------------------------------------------------------
# inspect


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a packed checkpoint without building the model.

    Returns:
        ``format``/``format_version``, ``model_config`` (or None), ``plan`` (dict);
        ``layers``: per layer name, scheme, bits, params, code/scale/bias bytes and their sum;
        ``bytes``: file, codes, scales, biases, float, metadata, and overhead (file minus those parts);
        ``fp32_bytes``: the FP32 size of the float model (:func:`hq_ptq.compression.fp32_bytes`);
        ``compression``: ``weights`` (32 / the plan's average bits) and ``file`` (FP32 size / this file),
        the definitions of :mod:`hq_ptq.compression`; ``stored_bits_per_weight``: code bytes × 8 per
        quantized weight (the average bits plus the padding of packing each layer to whole bytes).

    Raises:
        CheckpointError: as :func:`load` for unreadable, foreign or corrupt files.
    """
    md, tensors, file_size = _read(path)
    parsed = _parse(path, md, tensors)
    state = parsed["state"]
    layers, per_layer = parsed["layers"], []
    scale_keys: set[str] = set()
    bias_keys: set[str] = set()
    fp32_weights = 0  # elements of the float model's weights: a layer's once per name it is registered under
    for entry in layers:
        name, names = entry["name"], entry.get("aliases", [entry["name"]])
        fp32_weights += len(names) * entry["params"]
        scale = [k for k in state if any(k.startswith(f"{a}.weight_quant.") for a in names)]
        bias = [k for k in state if k in {f"{a}.bias" for a in names}]
        scale_keys.update(scale)
        bias_keys.update(bias)
        per_layer.append({
            "name": name,
            "scheme": entry["scheme"],
            "bits": entry["bits"],
            "params": entry["params"],
            "code_bytes": entry["packed"].numel(),
            "scale_bytes": sum(_nbytes(state[k]) for k in scale),
            "bias_bytes": sum(_nbytes(state[k]) for k in bias),
        })
        per_layer[-1]["bytes"] = sum(per_layer[-1][f"{p}_bytes"] for p in ("code", "scale", "bias"))
    codes = sum(d["code_bytes"] for d in per_layer)
    scales = sum(d["scale_bytes"] for d in per_layer)
    biases = sum(d["bias_bytes"] for d in per_layer)
    floats = sum(_nbytes(t) for k, t in state.items() if k not in scale_keys | bias_keys)
    metadata = sum(len(k.encode()) + len(v.encode()) for k, v in md.items())
    n_weights = sum(d["params"] for d in per_layer)
    # the float model's state is this one less the quantizers' scales, plus the float weights
    fp32 = fp32_bytes([*(t for k, t in state.items() if k not in scale_keys), fp32_weights])
    plan = parsed["plan"]
    return {
        "path": str(path),
        "format": md["format"],
        "format_version": int(md["format_version"]),
        "model_config": parsed["config"],
        "plan": plan.to_dict(),
        "layers": per_layer,
        "bytes": {
            "file": file_size,
            "codes": codes,
            "scales": scales,
            "biases": biases,
            "float": floats,
            "metadata": metadata,
            "overhead": file_size - (codes + scales + biases + floats + metadata),
        },
        "fp32_bytes": fp32,
        "compression": {
            "weights": weight_compression(plan.avg_bits),
            "file": file_compression(fp32, file_size),
        },
        "stored_bits_per_weight": 8 * codes / max(n_weights, 1),
    }


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
