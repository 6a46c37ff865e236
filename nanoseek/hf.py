"""Model directories for inference: a nanoseek run, one of its checkpoints, or a Hugging Face-format
directory (config.json with `model_type` + safetensors, single file or sharded with an index).

    run dir:        config.json (run config, "model" table) + tokenizer.json + checkpoints/latest -> step_N/
    checkpoint dir: model.safetensors + state.json (the run dir is two levels up)
    HF dir:         config.json (DeepseekV3Config fields, or DeepSeek's inference format) +
                    model.safetensors[.index.json] [+ tokenizer.json]
                    FP8 weights in V3's format (e4m3 + `weight_scale_inv` per 128x128 block) are dequantized

Only safetensors and JSON are read (never pickles). A load builds the model on the meta device and reads
each tensor from the files' headers' offsets into its place (hf_keys.to_hf gives the place of every key):
the peak host memory is the model plus one tensor in transit, whatever the checkpoint's size.
"""

from __future__ import annotations

import collections
import ctypes
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nanoseek import gguf_io
from nanoseek.config import ModelConfig, fmt_count, read_model_config
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model import Transformer
from nanoseek.model import hf_keys
from nanoseek.model.fp8 import dequantize_blockwise, quantize_checkpoint
from nanoseek.quant import QuantExperts, QuantLinear, Spec
from nanoseek.quant.load import Staged, release_freed, shells
from nanoseek.runs import latest_checkpoint


@dataclass
class Pretrained:
    model: Transformer
    tokenizer: Tokenizer | None
    name: str  # what the server calls the model: the directory's name
    weights: Path  # the checkpoint directory the weights came from


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not readable JSON: {e}") from None


class Stored(NamedTuple):
    """One tensor of a safetensors file: where its bytes lie."""
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file
    nbytes: int


# safetensors dtype names (the format's spec) -> torch
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(file: Path) -> dict[str, Stored]:
    """The tensors of one safetensors file (8-byte header length, JSON header, data), checked against the
    file's size: a truncated or corrupt file is an error that names it."""
    def bad(why) -> ValueError:
        return ValueError(f"{file} is corrupt or truncated: {why}")

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= size - 8:
                raise bad(f"its header length ({n} bytes) does not fit in its {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise bad(e) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for key, h in header.items():
        try:
            name, shape, (start, stop) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} lacks a dtype, shape or data_offsets") from None
        if name not in _DTYPES:
            raise ValueError(f"{file}: tensor {key!r} has dtype {name}; nanoseek reads {sorted(_DTYPES)}")
        nbytes = math.prod(shape) * _DTYPES[name].itemsize
        if not (isinstance(start, int) and 0 <= start and stop - start == nbytes):
            raise bad(f"tensor {key!r}: bytes {start}..{stop} do not hold {shape} {name}")
        out[key] = Stored(file, _DTYPES[name], shape, 8 + n + start, nbytes)
        end = max(end, stop)
    if 8 + n + end > size:
        raise bad(f"its header describes {8 + n + end} bytes, the file has {size}")
    return out


def _checkpoint(directory: Path) -> dict[str, Stored]:
    """Every tensor of a checkpoint directory: model.safetensors, or the shards its index names (headers only)."""
    index = directory / "model.safetensors.index.json"
    weight_map = _read_json(index).get("weight_map") if index.is_file() else {"*": "model.safetensors"}
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' (tensor name -> shard file)")
    stored = {}
    for name in sorted(set(weight_map.values())):
        file = directory / name
        if not file.is_file():
            pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
            hint = (f"; it holds {pickles}, pickle checkpoints, which nanoseek never loads (convert them to "
                    f"safetensors)" if pickles else "")
            named = f", which {index.name} names" if index.is_file() else ""
            raise ValueError(f"{directory} has no {name}{named} (expected safetensors weights){hint}")
        stored.update(_header(file))
    lost = [k for k in weight_map if k != "*" and k not in stored]
    if lost:
        raise ValueError(f"{index} places {len(lost)} tensors in shards that do not hold them, e.g. {lost[0]!r} "
                         f"in {directory / weight_map[lost[0]]}")
    return stored


def _read(s: Stored, files: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bytes of `s` read straight into `out` (contiguous, on the CPU, of s's dtype and size) or a new tensor."""
    out = torch.empty(s.shape, dtype=s.dtype) if out is None else out
    if s.file not in files:
        files[s.file] = open(s.file, "rb", buffering=0)
    f, got = files[s.file], 0
    f.seek(s.offset)
    view = memoryview((ctypes.c_char * s.nbytes).from_address(out.data_ptr())).cast("B") if s.nbytes else b""
    while got < s.nbytes:  # one read() moves at most ~2 GiB
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{s.file} is corrupt or truncated: it ends inside a tensor")
        got += n
    return out


def _targets(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(checkpoint key -> the tensor of the model it fills, a view for a per-expert key; -> its state name),
    from hf_keys.to_hf (the one key mapping)."""
    cfg = model.config
    views, owner = {}, {}
    for name, t in model.state_dict().items():
        if not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            for key, v in hf_keys.to_hf({name: t}, cfg, mtp_copies=False).items():
                views[key], owner[key] = v, name
    return views, owner


def _plan(model: Transformer, stored: dict[str, Stored]) -> tuple[dict[str, str], list[str]]:
    """Checkpoint key -> the key of `_targets` or the state name (stacked experts, as transformers >= 5 saves
    them) it fills, checked as `load_hf_state_dict` checks (hf_keys.fit); also the buffers it lacks."""
    cfg, state = model.config, model.state_dict()
    views, owner = _targets(model)
    ours = {k: v.shape for k, v in views.items()}
    plan, mapped, unexpected, whole = {}, {}, [], set()
    for key, s in stored.items():
        if key.endswith("_scale_inv"):  # FP8 block scales: read with their weight
            if key[: -len("_scale_inv")] not in stored:
                raise ValueError(f"{key} ({s.file.name}) has no weight {key[: -len('_scale_inv')]} to scale")
            continue
        meta = torch.empty(s.shape, device="meta")
        if key not in views:
            try:
                named, extra = hf_keys.from_hf({key: meta}, cfg)
            except ValueError:
                named, extra = {}, [key]
            if not named and not extra:
                continue  # MTP's copies of the embedding and head
            name = next(iter(named), None)
            if extra or name not in state:
                unexpected.append(f"{key} ({s.file.name})")
                continue
            ours[key], plan[key] = state[name].shape, name
            whole.add(name)
        plan.setdefault(key, key)
        mapped[key] = meta
    buffers = {name for name, _ in model.named_buffers()}
    absent = [k for k in ours if k not in mapped and owner.get(k) in buffers]
    for k in [k for k in ours if owner.get(k) in whole or k in absent]:
        del ours[k]
    hf_keys.fit(mapped, unexpected, ours, cfg)
    return plan, absent


def _layout(model: Transformer, plan: dict[str, str]) -> dict[str, tuple[str, torch.Tensor]]:
    """Checkpoint key -> (the state name it fills, the view of that tensor it fills), from the (meta) model."""
    views, owner = _targets(model)
    state = model.state_dict()
    return {key: (owner[p], views[p]) if p in views else (p, state[p]) for key, p in plan.items()}


def _read_into(dest: torch.Tensor, key: str, stored: dict[str, Stored], files: dict, block) -> None:
    """Checkpoint tensor `key` into `dest`, converted to its dtype (FP8 dequantized with its block scales)."""
    s, scale = stored[key], stored.get(key + "_scale_inv")
    if scale is None and s.dtype == dest.dtype and dest.device.type == "cpu" and dest.is_contiguous():
        _read(s, files, dest)  # no copy: the file's bytes land in the parameter
    elif scale is not None:
        q, inv = _read(s, files).to(dest.device), _read(scale, files).to(dest.device)
        dest.copy_(dequantize_blockwise(q, inv, block, dest.dtype))
    else:
        dest.copy_(_read(s, files))


@torch.no_grad()
def _fill(model: Transformer, layout: dict[str, tuple[str, torch.Tensor]], stored: dict[str, Stored], block,
          staged: dict[str, Staged]) -> None:
    """Read every planned tensor into the (materialized) model, file by file in byte order; one tensor at a
    time is converted (dtype, FP8 dequantization) or staged on the host for another device. The weights in
    `staged` are gathered in buffers of their own, one expert's at a time where the checkpoint keeps experts
    apart, and handed over (quantized) as soon as each is complete: few are ever held in high precision."""
    state, files, pending = model.state_dict(), {}, {}
    try:
        for key in sorted(layout, key=lambda k: (stored[k].file, stored[k].offset)):
            name, view = layout[key]
            offset = view.storage_offset()
            if name in staged:
                shape, take, per_row = staged[name]
                row = math.prod(shape[1:])
                unit, unit_shape = (name, None), shape
                if per_row and view.numel() <= row:  # one expert's key
                    unit, unit_shape, offset = (name, offset // row), shape[1:], offset % row
                if unit not in pending:
                    pending[unit] = [torch.empty(unit_shape, dtype=view.dtype), math.prod(unit_shape)]
                base = pending[unit][0]
            else:
                base = state[name]
            _read_into(base.as_strided(view.shape, view.stride(), offset), key, stored, files, block)
            if name in staged:
                pending[unit][1] -= view.numel()
                if pending[unit][1] == 0:
                    take(unit[1], pending.pop(unit)[0])
                    release_freed()
    finally:
        for f in files.values():
            f.close()


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a load: MemAvailable (/proc/meminfo) on the CPU, free memory on a GPU; None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(model: Transformer, stored: dict[str, Stored], plan: dict[str, str], device: torch.device,
                  dtype: torch.dtype, where: Path, staged: dict, spec: Spec | None) -> None:
    """Print what the load needs (stderr) and refuse one that cannot fit: the meta model's tensors in their
    dtypes on `device`, the quantized modules' packed bytes, and what is in transit: the largest tensor read
    (converted, dequantized or staged on the host) and the largest weight gathered for quantization."""
    n = model.config.num_params()
    n = n.total + n.mtp
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    weights += sum(m.nbytes() for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts)))
    transit = max([stored[k].nbytes + (16 * stored[k].nbytes if k + "_scale_inv" in stored else 0)
                   for k in plan if stored[k].dtype != dtype or device.type != "cpu"], default=0)
    transit += max([math.prod(w.shape[1:] if w.per_row else w.shape) * dtype.itemsize for w in staged.values()],
                   default=0)
    needs = {"RAM": weights + transit} if device.type == "cpu" else {"RAM": transit, str(device): weights + transit}
    free = {kind: available_memory(torch.device("cpu") if kind == "RAM" else device) for kind in needs}
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    form = str(dtype)[6:] if spec is None else f"{spec.name} (kept tensors in {str(dtype)[6:]})"
    print(f"nanoseek: loading {where}: {fmt_count(n)} parameters in {form} = {gib(weights)} on "
          f"{device} (+ up to {gib(transit)} in transit); available: "
          + ", ".join(f"{'?' if free[k] is None else gib(free[k])} {k}" for k in needs), file=sys.stderr)
    for kind, need in needs.items():
        if free[kind] is not None and need > free[kind]:
            raise ValueError(f"{where}: the model needs {gib(need)} of {kind} ({fmt_count(n)} parameters in "
                             f"{form}, + {gib(transit)} in transit) but only {gib(free[kind])} is available; "
                             f"load it quantized (--quantize int8|int4), in a smaller dtype, on another device "
                             f"or with more free memory")


def _load_dtype(dtype: torch.dtype | str | None, config: dict, stored: dict[str, Stored]) -> torch.dtype:
    """dtype as given (a name or torch.dtype); None / "auto": the config's `torch_dtype` (`dtype` in
    transformers >= 5, "bf16" / "fp8" in DeepSeek's inference format: bf16), else the stored weights' dtype."""
    if dtype in (None, "auto"):
        name = config.get("torch_dtype") or config.get("dtype")
        name = {"bf16": "bfloat16", "fp8": "bfloat16"}.get(name, name)
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            dtype = name
        else:
            by_bytes = collections.Counter()
            for s in stored.values():
                by_bytes[s.dtype if s.dtype.itemsize > 1 else torch.bfloat16] += s.nbytes  # FP8: V3 runs in bf16
            dtype = max(by_bytes, key=by_bytes.get) if by_bytes else torch.float32
    d = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not (isinstance(d, torch.dtype) and d.is_floating_point and d.itemsize >= 2):
        raise ValueError(f"dtype {dtype!r} cannot hold the weights: use float32, bfloat16 or float16")
    return d


def locate(path: str | Path) -> tuple[Path, Path, ModelConfig]:
    """(directory with config.json and tokenizer.json, directory with the weights, model config)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected a run, checkpoint or Hugging Face model directory)")
    if (path / "state.json").is_file() and not (path / "config.json").is_file():
        run, weights = path.parent.parent, path  # a checkpoint inside runs/NAME/checkpoints/
    else:
        run, weights = path, path
    if not (run / "config.json").is_file():
        raise ValueError(f"{run} has no config.json: not a nanoseek run or Hugging Face model directory")
    config = _read_json(run / "config.json")
    cfg = read_model_config(config, run / "config.json")  # run, Hugging Face or DeepSeek inference format
    if isinstance(config.get("model"), dict) and weights is run:  # a nanoseek run: its latest checkpoint
        weights = latest_checkpoint(run)
        if weights is None:
            raise ValueError(f"{run} holds no checkpoint yet (checkpoints/latest is missing)")
    return run, weights, cfg


def _open(path: str | Path, dtype, quantized: bool):
    """A folder's (run dir, weights dir, meta model in the load dtype, stored tensors, _plan's plan and absent
    buffers, FP8 block size)."""
    run, weights, cfg = locate(path)
    config = _read_json(run / "config.json")
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size", [128, 128])
    if quant and (quant.get("quant_method") != "fp8" or not (isinstance(block, list) and len(block) == 2)):
        raise ValueError(f"{run / 'config.json'}: quantization_config {quant} is not DeepSeek's blockwise FP8")
    stored = _checkpoint(weights)
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.")
                                                for k in stored):
        cfg = cfg.replace(num_nextn_predict_layers=0)  # saved by transformers, which has no MTP module
    dtype = _load_dtype("bfloat16" if quantized and dtype in (None, "auto") else dtype, config, stored)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # the router biases stay fp32 (Gate._apply)
    try:
        plan, absent = _plan(model, stored)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    return run, weights, model, stored, plan, absent, tuple(block)


def load_pretrained(path: str | Path, device: str | torch.device | None = "cpu",
                    dtype: torch.dtype | str | None = None, needs_tokenizer: str | None = None,
                    quantize: Spec | str | None = None) -> Pretrained:
    """Load a model (and its tokenizer, when the directory has one) ready for inference. device None: cuda
    when available, else cpu. dtype None or "auto": the checkpoint's (`_load_dtype`), or a torch.dtype or its
    name ("bfloat16"). needs_tokenizer names the use that requires a tokenizer.json (an error otherwise).
    quantize: int8 / int4 weights (nanoseek.quant), each quantized as it is read (CPU only); dtype None or
    "auto" is then bfloat16, the activations torch's packed kernels are fast with (fp32 ones: 3-6x slower).
    None: as stored. A `.gguf` file is read by gguf_io.read (None keeps its blocks, "none" dequantizes them).

    The model is built on the meta device (no random init) and filled tensor by tensor from the safetensors
    files, each read straight into its parameter when the dtype matches (no copy of the whole checkpoint on
    the host). What the load needs is printed to stderr first; a load that cannot fit is refused."""
    if Path(path).suffix == ".gguf" and Path(path).is_file():
        model, tokenizer = gguf_io.read(path, device, dtype, {None: "auto", "none": None}.get(quantize, quantize))
        if tokenizer is None and needs_tokenizer:
            raise ValueError(f"{path} has no tokenizer: {needs_tokenizer} needs one")
        return Pretrained(model, tokenizer, Path(path).stem, Path(path))
    quantize = None if quantize == "none" else quantize
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quantize is not None and device.type != "cpu":
        raise ValueError(f"--quantize {quantize.name} runs on torch's CPU kernels; device {device} is not the CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this machine (torch {torch.__version__}) has no usable CUDA GPU")
    run, weights, model, stored, plan, absent, block = _open(path, dtype, quantize is not None)
    cfg, dtype = model.config, model.embed_tokens.weight.dtype
    try:
        layout = _layout(model, plan)
        staged = {} if quantize is None else shells(model, quantize)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    _check_memory(model, stored, plan, device, dtype, weights, staged, quantize)
    model = gguf_io.materialize(model, device)
    if absent:
        print(f"nanoseek: {weights} lacks {len(absent)} buffers ({absent[0]}, ...): they start at zero",
              file=sys.stderr)
    _fill(model, layout, stored, block, staged)
    model.eval()
    tokenizer = Tokenizer.load(run) if (run / "tokenizer.json").is_file() else None
    if tokenizer is None and needs_tokenizer:
        raise ValueError(f"{path} has no tokenizer.json: {needs_tokenizer} needs one")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{run / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}")
    return Pretrained(model, tokenizer, run.resolve().name, weights)


def export(path: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 << 30, fp8: bool = False,
           scale_fmt: str = "fp32") -> Path:
    """A run / checkpoint / HF directory -> a Hugging Face folder that `AutoModelForCausalLM` and
    `AutoTokenizer` load: config.json, generation_config.json, safetensors (sharded with an index past
    max_shard_bytes), tokenizer.json + tokenizer_config.json with the chat template. Router biases are
    shifted so their minimum is 0 (selection is unchanged: every expert moves by the same amount; older
    transformers releases assume non-negative biases). fp8: V3's FP8 format for the weights V3 quantizes
    (e4m3 `weight` + fp32 `weight_scale_inv` per 128x128 block, `quantization_config`; scale_fmt "ue8m0":
    power-of-two scales, marked as in V3.1's config)."""
    from safetensors.torch import save_file

    pre = load_pretrained(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = pre.model.config
    tensors = {}
    for key, t in pre.model.hf_state_dict().items():
        t = t.detach().contiguous().clone()  # MTP's embedding / head copies must not share storage
        if key.endswith("e_score_correction_bias"):
            t = t - t.min().clamp(max=0)
        tensors[key] = t
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if fp8:
        tensors = quantize_checkpoint(tensors, 128, scale_fmt)
        if scale_fmt == "ue8m0":
            quant["scale_fmt"] = "ue8m0"
    shards, size = [[]], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        save_file({k: tensors[k] for k in keys}, out / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    dtype = str(pre.model.embed_tokens.weight.dtype).removeprefix("torch.")  # the checkpoint's, kept
    hf_config = {**cfg.to_hf_dict(), "torch_dtype": dtype} | ({"quantization_config": quant} if fp8 else {})
    (out / "config.json").write_text(json.dumps(hf_config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}, indent=1))
    if pre.tokenizer is not None:  # its files, special tokens and chat template, as the folder had them
        pre.tokenizer.config.setdefault("model_max_length", cfg.max_position_embeddings)
        pre.tokenizer.save(out)
    return out


def export_gguf(path: str | Path, out: str | Path, qtype: str = "f32") -> Path:
    """A run / checkpoint / HF directory -> one GGUF file for llama.cpp (gguf_io.write), streamed: each tensor
    is read from the checkpoint when it is written, so a model larger than memory exports too."""
    run, weights, model, stored, plan, _, block = _open(path, "float32", False)
    if not (run / "tokenizer.json").is_file():
        raise ValueError(f"{run} has no tokenizer.json: a GGUF file carries the tokenizer")
    layout, state = _layout(model, plan), model.state_dict()
    keys = collections.defaultdict(list)
    for key, (name, _) in layout.items():
        keys[name].append(key)

    @torch.no_grad()
    def tensor(name: str) -> torch.Tensor:
        out, files = torch.zeros(state[name].shape, dtype=state[name].dtype), {}  # absent buffers: zero
        try:
            for key in keys[name]:
                view = layout[key][1]
                _read_into(out.as_strided(view.shape, view.stride(), view.storage_offset()), key, stored, files, block)
        finally:
            for f in files.values():
                f.close()
        return out

    return gguf_io.write(model.config, Tokenizer.load(run), run.resolve().name, out, qtype, tensor)
