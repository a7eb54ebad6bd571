"""The DiT's configuration: Wan2.1's text-to-video transformer, read from either checkpoint layout."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["WanConfig"]

# Keys of the two config.json layouts that describe nothing the T2V model computes, or that name
# what we already fixed (diffusers' and Wan's bookkeeping). Anything else unknown is an error.
_IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "window_size", "model_type", "text_len",
    "rope_max_seq_len", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len",
}


@dataclass(frozen=True)
class WanConfig:
    """Wan2.1 DiT hyper-parameters; the defaults are Wan2.1-T2V-1.3B's.

    ``head_dim = dim // num_heads`` is split into 3D RoPE parts ``(t, h, w)`` of
    ``head_dim - 4*(head_dim//6)``, ``2*(head_dim//6)``, ``2*(head_dim//6)`` channels (44/42/42
    for 128), as Wan2.1 does. ``qk_norm`` is RMSNorm over all heads' channels at once.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        ints = ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "freq_dim",
                "text_dim", "text_len")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints, got {self.patch_size!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim={self.dim} is not a multiple of num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim = dim // num_heads = {self.head_dim} must be even and >= 6 (3D RoPE)")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        if not self.eps > 0:
            raise ValueError(f"WanConfig.eps must be positive, got {self.eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head given to the (t, h, w) rotary embedding."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "WanConfig":
        """Read Wan2.1's ``config.json`` (``dim``, ``in_dim``, ...), diffusers'
        (``num_attention_heads``, ``attention_head_dim``, ...) or our own :meth:`to_dict`."""
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if data.get("model_type", "t2v") != "t2v":
            raise ValueError(f"{source}: model_type={data['model_type']!r}; only Wan2.1's text-to-video DiT "
                             f"('t2v') is supported")
        for key in ("image_dim", "added_kv_proj_dim"):
            if data.get(key) is not None:
                raise ValueError(f"{source}: {key}={data[key]!r} is an image-to-video model; only text-to-video "
                                 f"DiTs are supported")
        renames = {"in_dim": "in_channels", "out_dim": "out_channels"}
        out: dict = {}
        if "num_attention_heads" in data:  # diffusers' layout
            heads = data.pop("num_attention_heads")
            out["num_heads"] = heads
            out["dim"] = heads * data.pop("attention_head_dim", 128)
            qk = data.pop("qk_norm", "rms_norm_across_heads")
            if qk not in (None, "rms_norm_across_heads"):
                raise ValueError(f"{source}: qk_norm={qk!r} is not supported (expected 'rms_norm_across_heads')")
            out["qk_norm"] = qk is not None
        known = {f.name for f in fields(cls)}
        unknown = []
        for key, value in data.items():
            key = renames.get(key, key)
            if key in known:
                out[key] = value
            elif key not in _IGNORED:
                unknown.append(key)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {sorted(unknown)}")
        if "patch_size" in out:
            out["patch_size"] = tuple(out["patch_size"])
        return cls(**out)

    @classmethod
    def from_json(cls, path) -> "WanConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such config file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def to_diffusers_dict(self) -> dict:
        """The same model as diffusers' ``WanTransformer3DModel`` config."""
        return {
            "_class_name": "WanTransformer3DModel", "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads, "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels, "out_channels": self.out_channels, "text_dim": self.text_dim,
            "freq_dim": self.freq_dim, "ffn_dim": self.ffn_dim, "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if self.qk_norm else None,
            "eps": self.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        }

    def to_wan_dict(self) -> dict:
        """The same model as Wan2.1's own ``config.json``."""
        return {
            "_class_name": "WanModel", "model_type": "t2v", "patch_size": list(self.patch_size),
            "text_len": self.text_len, "in_dim": self.in_channels, "dim": self.dim, "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim, "text_dim": self.text_dim, "out_dim": self.out_channels,
            "num_heads": self.num_heads, "num_layers": self.num_layers, "qk_norm": self.qk_norm,
            "cross_attn_norm": self.cross_attn_norm, "eps": self.eps,
        }
