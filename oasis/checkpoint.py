"""Reading and writing DiT checkpoints: diffusers' layout and Wan2.1's, local folders only.

Both layouts are a folder with ``config.json`` and safetensors (one file, or shards listed by a
``*.safetensors.index.json``), as ``save_pretrained`` and Wan2.1's releases write them. They differ
in the config keys (:meth:`WanConfig.from_dict` reads both) and in the tensor names, mapped here
onto ours (which are Wan2.1's). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import WanConfig

__all__ = ["CheckpointError", "load_dit", "save_dit", "read_safetensors", "read_safetensors_file", "write_safetensors", "to_layout",
           "from_layout", "detect_layout", "find_dit_folder", "check_state"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the folder and every problem."""


# (diffusers' name prefix, ours): ours are Wan2.1's names. Inside a block the prefix follows
# "blocks.<i>."; a prefix ending without "." names one whole tensor.
_BLOCK_NAMES = [
    *((f"attn1.to_{x}.", f"self_attn.{x}.") for x in "qkv"), ("attn1.to_out.0.", "self_attn.o."),
    *((f"attn1.norm_{x}.", f"self_attn.norm_{x}.") for x in "qk"),
    *((f"attn2.to_{x}.", f"cross_attn.{x}.") for x in "qkv"), ("attn2.to_out.0.", "cross_attn.o."),
    *((f"attn2.norm_{x}.", f"cross_attn.norm_{x}.") for x in "qk"),
    ("norm2.", "norm3."),  # the cross-attention norm: diffusers' norm2 is Wan2.1's norm3
    ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."), ("scale_shift_table", "modulation"),
]
_TOP_NAMES = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("scale_shift_table", "head.modulation"), ("proj_out.", "head.head."),
]
_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _swap(pairs):
    return [(b, a) for a, b in pairs]


def _rename(key: str, block_names, top_names) -> str:
    m = _BLOCK.match(key)
    prefix, rest, names = (*m.groups(), block_names) if m else ("", key, top_names)
    for src, dst in names:
        if rest == src or (src.endswith(".") and rest.startswith(src)):
            return prefix + dst + rest[len(src):]
    return key


def from_layout(state: dict, layout: str) -> dict:
    """Tensor names of ``layout`` (``"diffusers"`` or ``"wan"``) -> ours."""
    if layout == "wan":
        return dict(state)
    if layout != "diffusers":
        raise ValueError(f"layout must be 'diffusers' or 'wan', got {layout!r}")
    return {_rename(k, _BLOCK_NAMES, _TOP_NAMES): v for k, v in state.items()}


def to_layout(state: dict, layout: str) -> dict:
    """Our tensor names -> ``layout``'s."""
    if layout == "wan":
        return dict(state)
    if layout != "diffusers":
        raise ValueError(f"layout must be 'diffusers' or 'wan', got {layout!r}")
    return {_rename(k, _swap(_BLOCK_NAMES), _swap(_TOP_NAMES)): v for k, v in state.items()}


def detect_layout(keys) -> str:
    keys = list(keys)
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)
    wan = any(k.startswith(("time_embedding.", "text_embedding.")) or ".self_attn." in k for k in keys)
    if diffusers and wan:
        raise CheckpointError("tensor names mix diffusers' layout (condition_embedder., attn1.) with Wan2.1's "
                              "(time_embedding., self_attn.)")
    if not diffusers and not wan:
        raise CheckpointError(f"tensor names are neither diffusers' nor Wan2.1's DiT layout (first keys: "
                              f"{sorted(keys)[:5]})")
    return "diffusers" if diffusers else "wan"


# -- safetensors folders ------------------------------------------------------------------------
def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError("reading checkpoints needs the safetensors package: pip install 'oasis-kernels[vsr]'") \
            from None
    return st


def read_safetensors_file(path: Path) -> dict:
    try:
        return _safetensors().load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt or truncated files
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None


def read_safetensors(folder: Path) -> dict:
    """Every tensor of a folder's safetensors: the shards of an index, or the ``*.safetensors`` present."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several shard indexes {[p.name for p in indexes]}; keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{indexes[0]}: not a safetensors index ({exc!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in {indexes[0].name} are missing: {missing}")
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{folder}: no *.safetensors files (and no shard index)")
    state: dict = {}
    for p in paths:
        part = read_safetensors_file(p)
        dup = set(part) & set(state)
        if dup:
            raise CheckpointError(f"{folder}: tensors stored twice across files: {sorted(dup)[:5]}")
        state.update(part)
    return state


def write_safetensors(state: dict, folder: Path, stem: str, max_shard_bytes: int | None = None,
                      metadata: dict | None = None) -> list[str]:
    """Write ``state`` as ``{stem}.safetensors`` or, above ``max_shard_bytes``, as shards plus an index."""
    st = _safetensors()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += nbytes
    if len(shards) == 1:
        name = f"{stem}.safetensors"
        st.save_file(shards[0], str(folder / name), metadata=metadata or {"format": "pt"})
        return [name]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(shard, str(folder / name), metadata=metadata or {"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def find_dit_folder(path) -> Path:
    """The folder holding the DiT: ``path`` itself, or its ``transformer/`` (a diffusers pipeline)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a folder (config.json + safetensors), got a file")
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (nor transformer/config.json)")
    return path


def check_state(state: dict, model, folder) -> None:
    """One error listing every unknown, missing and mis-shaped tensor, and every integer or boolean one where
    the model holds floats (``load_state_dict`` would fail on it with a traceback)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    shaped = sorted(f"{k}: {tuple(state[k].shape)} in the file, {expected[k]} in the model"
                    for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    floating = {k for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
    kinds = sorted(f"{k}: {str(state[k].dtype).replace('torch.', '')} in the file, floating point in the model"
                   for k in set(state) & floating if not state[k].is_floating_point())
    problems = []
    for what, items in (("unknown tensors", unknown), ("missing tensors", missing), ("mis-shaped tensors", shaped),
                        ("tensors of another kind", kinds)):
        if items:
            problems.append(f"{len(items)} {what}: " + ", ".join(items))
    if problems:
        raise CheckpointError(f"{folder}: the tensors do not fit the config's model; " + "; ".join(problems))


def load_dit(path, *, routing=None, window=(3, 5, 5), dtype=torch.float32, device="cpu"):
    """Build a :class:`~oasis.WanDiT` from a local folder in diffusers' or Wan2.1's layout."""
    from .dit import WanDiT

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    device = torch.device(device)
    folder = find_dit_folder(path)
    config = WanConfig.from_json(folder / "config.json")
    state = read_safetensors(folder)
    layout = detect_layout(state)
    state = from_layout(state, layout)
    with torch.device("meta"):
        model = WanDiT(config)
    check_state(state, model, folder)
    model.load_state_dict(state, assign=True, strict=True)
    model.cast(dtype).to(device)
    model.layout = layout
    if routing is not None:
        model.set_routing(routing, window)
    return model


def save_dit(model, path, *, layout: str = "diffusers", max_shard_bytes: int | None = None) -> None:
    """Write the DiT (checkpoint head order, whatever its routing) in ``layout``."""
    if layout not in ("diffusers", "wan"):
        raise ValueError(f"layout must be 'diffusers' or 'wan', got {layout!r}")
    folder = Path(path)
    config = model.config.to_diffusers_dict() if layout == "diffusers" else model.config.to_wan_dict()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(to_layout(model.state_dict(), layout), folder, "diffusion_pytorch_model", max_shard_bytes)
