"""oasis.WanDiT against diffusers' WanTransformer3DModel (same random weights, tiny configs, CPU).

Parity is checked in float64 so that any difference is a difference of the math, not of rounding.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import oasis_kernels as ok

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from oasis import CheckpointError, WanConfig, WanDiT  # noqa: E402
from oasis import dit as dit_module  # noqa: E402

CFG = WanConfig(dim=48, ffn_dim=80, num_heads=4, num_layers=2, text_dim=24, text_len=7, freq_dim=32,
                in_channels=4, out_channels=4)
ROUTING = [["intra", "global", "window", "intra"], ["window", "window", "global", "intra"]]


def diffusers_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers_dict().items() if not k.startswith("_")}
    model = diffusers.WanTransformer3DModel(**kwargs).eval()
    with torch.no_grad():  # Wan zero-initialises some tensors: make every one of them matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def inputs(b=2, t=3, h=6, w=10, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CFG.in_channels, t, h, w, generator=g, dtype=dtype)
    ts = torch.tensor([799.0, 250.0][:b], dtype=dtype)
    ctx = torch.randn(b, CFG.text_len, CFG.text_dim, generator=g, dtype=dtype)
    return x, ts, ctx


# Wan2.1's own tensor names for diffusers' ones, written out independently of oasis.checkpoint
def wan_name(key: str) -> str:
    top = {
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "proj_out": "head.head",
    }
    if key == "scale_shift_table":
        return "head.modulation"
    for a, b in top.items():
        if key.startswith(a + "."):
            return b + key[len(a):]
    if not key.startswith("blocks."):
        return key
    _, i, rest = key.split(".", 2)
    block = {
        "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
        "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
        "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
        "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
        "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    }
    if rest == "scale_shift_table":
        return f"blocks.{i}.modulation"
    for a, b in block.items():
        if rest.startswith(a + "."):
            return f"blocks.{i}.{b}{rest[len(a):]}"
    raise AssertionError(f"unmapped diffusers key {key}")


def write_wan_checkpoint(ref, folder, cfg=CFG):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": cfg.dim,
              "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels,
              "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "text_len": cfg.text_len,
              "text_dim": cfg.text_dim, "eps": cfg.eps}
    (folder / "config.json").write_text(json.dumps(config))
    state = {wan_name(k): v.contiguous() for k, v in ref.state_dict().items()}
    safetensors_torch.save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def reference_output(ref, x, ts, ctx):
    with torch.no_grad():
        return ref.double()(x, ts, ctx).sample


@pytest.mark.parametrize("layout", ["diffusers", "diffusers-sharded", "wan"])
def test_matches_diffusers_both_layouts(tmp_path, layout):
    ref = diffusers_model()
    folder = tmp_path / "ckpt"
    if layout == "wan":
        write_wan_checkpoint(ref, folder)
    else:
        ref.save_pretrained(str(folder), max_shard_size="20KB" if layout.endswith("sharded") else "10GB")
        if layout.endswith("sharded"):
            assert len(list(folder.glob("*.safetensors"))) > 1
    model = WanDiT.from_pretrained(folder, dtype=torch.float64)
    # diffusers' config has no text_len (the zero context's length): Wan's default stands there
    assert dataclasses.replace(model.config, text_len=CFG.text_len) == CFG
    x, ts, ctx = inputs()
    want = reference_output(ref, x, ts, ctx)
    with torch.no_grad():
        got = model(x, ts, ctx)
    assert got.shape == want.shape == x.shape
    # diffusers computes the timestep embedding and its LayerNorms in float32 even in a float64
    # model (sin/cos of t*freq at t = 799 alone carry ~5e-5 rad); our float64 path does not
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * want.abs().max().item(), (err, want.abs().max().item())


def test_matches_diffusers_float32_odd_grid():
    """fp32, one video, a grid of odd sizes (5, 3, 7) and a scalar timestep."""
    ref = diffusers_model().float()
    model = WanDiT(CFG).eval()
    model.load_state_dict(dit_module_state(ref))
    x, _, ctx = inputs(b=1, t=5, h=6, w=14, dtype=torch.float32)
    with torch.no_grad():
        want = ref(x, torch.tensor([500.0]), ctx).sample
        got = model(x, 500.0, ctx)
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), err


def dit_module_state(ref):
    from oasis.checkpoint import from_layout

    return from_layout(ref.state_dict(), "diffusers")


def masked_sdpa_model(modes_per_layer, window):
    """Patch the model's attention call with dense masked attention over checkpoint head order."""

    def attend(q, k, v, plan):
        masks = torch.stack([ok.mask_for(m, plan.grid, window).materialize(q.device) for m in plan.modes])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=masks)
        return out.transpose(1, 2)

    return attend


def test_routed_layers_match_a_dense_masked_reference(monkeypatch):
    """Routed + permuted model == unpermuted model whose attention is dense SDPA with each head's mask."""
    ref = diffusers_model()
    state = dit_module_state(ref)
    routed = WanDiT(CFG).double().eval()
    routed.load_state_dict(state)
    routed.set_routing(ROUTING, window=(3, 3, 5))
    assert routed.blocks[0].self_attn.plan((3, 3, 5)).is_contiguous
    x, ts, ctx = inputs()
    with torch.no_grad():
        got = routed(x, ts, ctx)

    dense = WanDiT(CFG).double().eval()
    dense.load_state_dict(state)
    for block, modes in zip(dense.blocks, ROUTING):  # modes in checkpoint order, no permutation
        block.self_attn.modes = tuple(ok.Mode.parse(m) for m in modes)
        block.self_attn.window = (3, 3, 5)
    monkeypatch.setattr(dit_module.ok, "routed_attention", masked_sdpa_model(ROUTING, (3, 3, 5)))
    with torch.no_grad():
        want = dense(x, ts, ctx)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # and routing changes the result (the test can fail)
    with torch.no_grad():
        assert (want - reference_output(ref, x, ts, ctx)).abs().max() > 1e-3


def test_permutation_is_invisible_outside():
    ref = diffusers_model()
    state = dit_module_state(ref)
    model = WanDiT(CFG).double().eval()
    model.load_state_dict(state)
    x, ts, ctx = inputs()
    with torch.no_grad():
        before = model(x, ts, ctx)
    model.set_routing(ROUTING)
    attn = model.blocks[0].self_attn
    assert attn.order != tuple(range(CFG.num_heads))  # the weights really moved
    saved = model.state_dict()
    for k, v in state.items():
        assert torch.equal(saved[k], v), k
    # another routing, then back to all-global: the exact original numbers
    model.set_routing(list(reversed(ROUTING)))
    direct = WanDiT(CFG).double().eval()
    direct.load_state_dict(state)
    direct.set_routing(list(reversed(ROUTING)))
    with torch.no_grad():
        torch.testing.assert_close(model(x, ts, ctx), direct(x, ts, ctx), rtol=0, atol=0)
    model.set_routing(None)
    with torch.no_grad():
        torch.testing.assert_close(model(x, ts, ctx), before, rtol=0, atol=0)
    # loading checkpoint-order weights into a routed model permutes them on the way in
    direct.load_state_dict(state)
    model.set_routing(list(reversed(ROUTING)))
    with torch.no_grad():
        torch.testing.assert_close(direct(x, ts, ctx), model(x, ts, ctx))


def interleaved_rope(x, cos, sin):
    """Wan2.1's RoPE: channel pairs (2i, 2i+1) of ``x [B, N, heads, D]`` rotated by ``cos, sin [N, D/2]``."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


def test_rotate_half_layout_is_invisible_outside():
    """q/k rows and norm weights sit in rotate-half order inside each head; the state dict stays in
    the checkpoint's order, and a layer equals Wan's interleaved RoPE on the checkpoint's weights."""
    ref = diffusers_model()
    state = {k: v.double() for k, v in dit_module_state(ref).items()}
    model = WanDiT(CFG).double().eval()
    model.load_state_dict(state)
    heads, d = CFG.num_heads, CFG.head_dim
    half = list(range(0, d, 2)) + list(range(1, d, 2))
    assert dit_module.rotate_half_order(d) == tuple(half)
    attn = model.blocks[0].self_attn
    for name, param in (("q.weight", attn.q.weight), ("k.bias", attn.k.bias), ("norm_q.weight", attn.norm_q.weight)):
        want = state[f"blocks.0.self_attn.{name}"]
        assert torch.equal(param, want.unflatten(0, (heads, d))[:, half].flatten(0, 1)), name
    assert torch.equal(attn.v.weight, state["blocks.0.self_attn.v.weight"])  # v and o stay as they are
    assert torch.equal(attn.o.weight, state["blocks.0.self_attn.o.weight"])

    # the state dict round-trips in the checkpoint's order, unrouted and routed
    for routing in (None, ROUTING):
        model.set_routing(routing)
        saved = model.state_dict()
        assert saved.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(saved[k], v), k
        again = WanDiT(CFG).double().eval()
        again.load_state_dict(saved)
        again.set_routing(routing)
        assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))

    # apply_rope on rotate-half channels == the interleaved RoPE, channels permuted alike
    grid = (3, 3, 5)
    cos, sin = dit_module.rope_tables(grid, CFG, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cos.shape[0], heads, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dit_module.apply_rope(x[..., half], cos, sin), interleaved_rope(x, cos, sin)[..., half],
                               rtol=0, atol=0)

    # one self-attention layer (all heads global) == Wan's formula on the checkpoint's weights
    model.set_routing(None)
    h = torch.randn(2, cos.shape[0], CFG.dim, generator=g, dtype=torch.float64)

    def proj(name, y):
        return F.linear(y, state[f"blocks.0.self_attn.{name}.weight"], state[f"blocks.0.self_attn.{name}.bias"])

    def rms(name, y):
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + CFG.eps) * state[f"blocks.0.self_attn.{name}.weight"]

    q = interleaved_rope(rms("norm_q", proj("q", h)).unflatten(-1, (heads, d)), cos, sin)
    k = interleaved_rope(rms("norm_k", proj("k", h)).unflatten(-1, (heads, d)), cos, sin)
    v = proj("v", h).unflatten(-1, (heads, d))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    want = proj("o", y.flatten(2))
    with torch.no_grad():
        got = attn(h, grid, (cos, sin))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_routing_file_and_errors(tmp_path):
    from oasis_kernels.routing import LayerRouting, RoutingFile

    model = WanDiT(CFG)
    rf = RoutingFile([LayerRouting(f"blocks.{i}.self_attn", [ok.Mode.parse(m) for m in modes])
                      for i, modes in enumerate(ROUTING)], rho=0.25, window=(1, 3, 3), eps=1e-6, query_stride=1,
                     videos=1, num_global=2)
    rf.save(tmp_path / "r.json")
    model.set_routing(tmp_path / "r.json")
    assert [list(m) for m in model.routing] == [[ok.Mode.parse(m) for m in modes] for modes in ROUTING]
    assert model.blocks[0].self_attn.window == (1, 3, 3)
    # matched by name, not by order; names of another model refused
    rf.layers.reverse()
    model.set_routing(rf)
    assert [list(m) for m in model.routing] == [[ok.Mode.parse(m) for m in modes] for modes in ROUTING]
    rf.layers[0].name = "transformer_blocks.1.attn1"  # diffusers' name of the same block
    model.set_routing(rf)
    assert [list(m) for m in model.routing] == [[ok.Mode.parse(m) for m in modes] for modes in ROUTING]
    for name, says in (("other.0", "names no block of this DiT"), ("blocks.7.self_attn", "names block 7 of 2"),
                       ("blocks.0.self_attn", "names block 0 twice")):
        rf.layers[0].name = name
        with pytest.raises(ValueError, match=f"routing file layer '{name}' {says}"):
            model.set_routing(rf)
    with pytest.raises(ValueError, match="does not exist"):
        model.set_routing(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="lists 1 layers"):
        model.set_routing([["global"] * 4])
    with pytest.raises(ValueError, match="must list 4 modes"):
        model.set_routing([["global"] * 3, ["global"] * 4])
    with pytest.raises(ValueError, match="unknown attention mode"):
        model.set_routing([["global"] * 3 + ["diagonal"], ["global"] * 4])
    with pytest.raises(TypeError):
        model.set_routing(42)


def test_from_pretrained_lists_every_bad_key(tmp_path):
    ref = diffusers_model()
    folder = tmp_path / "bad"
    ref.save_pretrained(str(folder))
    path = folder / "diffusion_pytorch_model.safetensors"
    state = safetensors_torch.load_file(str(path))
    del state["blocks.0.attn1.to_q.weight"]
    state["blocks.1.attn1.extra.weight"] = torch.zeros(2)
    state["proj_out.bias"] = torch.zeros(3)
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        WanDiT.from_pretrained(folder)
    msg = str(info.value)
    assert "blocks.0.self_attn.q.weight" in msg and "missing" in msg
    assert "blocks.1.attn1.extra.weight" in msg and "unknown" in msg
    assert "head.head.bias: (3,) in the file" in msg


def test_from_pretrained_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        WanDiT.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        WanDiT.from_pretrained(tmp_path / "empty")
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_diffusers_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        WanDiT.from_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        WanDiT.from_pretrained(folder)
    bad_cfg = tmp_path / "i2v"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text(json.dumps({**CFG.to_diffusers_dict(), "image_dim": 1280}))
    with pytest.raises(ValueError, match="image-to-video"):
        WanDiT.from_pretrained(bad_cfg)
    with pytest.raises(TypeError, match="dtype"):
        WanDiT.from_pretrained(bad_cfg, dtype="bf16")


def test_save_and_reload_both_layouts(tmp_path):
    model = WanDiT(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.set_routing(ROUTING)
    x, ts, ctx = inputs(dtype=torch.float32)
    with torch.no_grad():
        want = model(x, ts, ctx)
    for layout in ("diffusers", "wan"):
        model.save_pretrained(tmp_path / layout, layout=layout, max_shard_bytes=30_000)
        assert (tmp_path / layout / "diffusion_pytorch_model.safetensors.index.json").is_file()
        back = WanDiT.from_pretrained(tmp_path / layout, routing=ROUTING)
        assert back.layout == layout
        with torch.no_grad():
            torch.testing.assert_close(back(x, ts, ctx), want, rtol=0, atol=0)


def test_constant_context_is_embedded_once_and_refreshed():
    model = WanDiT(CFG).double().eval()
    x, ts, ctx = inputs(b=2)
    model.set_context(ctx[:1, :5])
    calls = []
    original = model._embed_context
    model._embed_context = lambda c: calls.append(1) or original(c)
    with torch.no_grad():
        a = model(x, ts)
        b = model(x, ts)
        want = model(x, ts, ctx[:1, :5].expand(2, -1, -1))
    assert len(calls) == 2  # once for the cache, once for the explicit context
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, want)
    with torch.no_grad():  # an in-place update of a weight the cache depends on
        model.blocks[1].cross_attn.k.weight.mul_(2)
        c = model(x, ts)
        want2 = model(x, ts, ctx[:1, :5].expand(2, -1, -1))
    assert len(calls) == 4
    torch.testing.assert_close(c, want2)
    assert (c - a).abs().max() > 1e-6
    # a fused optimizer's step writes the weights without bumping their versions (the trainer's AdamW)
    model.blocks[0].cross_attn.v.weight.grad = torch.ones_like(model.blocks[0].cross_attn.v.weight)
    torch.optim.AdamW([model.blocks[0].cross_attn.v.weight], lr=0.1, fused=True).step()
    with torch.no_grad():
        d = model(x, ts)
        want3 = model(x, ts, ctx[:1, :5].expand(2, -1, -1))
    assert len(calls) == 6
    torch.testing.assert_close(d, want3)
    assert (d - c).abs().max() > 1e-6
    with pytest.raises(ValueError, match="context must be"):
        model.set_context(torch.zeros(5, 3))
    model.set_context(None)
    with pytest.raises(ValueError, match="no context"):
        model(x, ts)


def test_training_gradients_reach_the_context_weights():
    model = WanDiT(CFG).train()
    x, ts, ctx = inputs(b=1, dtype=torch.float32)
    model.set_context(ctx[0])
    model(x, ts).square().mean().backward()
    for name in ("text_embedding.0.weight", "blocks.0.cross_attn.k.weight", "blocks.1.self_attn.q.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_inputs_get_clear_errors():
    model = WanDiT(CFG)
    x, ts, ctx = inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="multiples of the patch"):
        model(x[..., :9], ts, ctx)
    with pytest.raises(ValueError, match="must be \\[B, 4, T, H, W\\]"):
        model(x[0], ts, ctx)
    with pytest.raises(ValueError, match="timestep has 3 entries"):
        model(x, torch.ones(3), ctx)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        WanConfig(dim=50, num_heads=4)


def test_cast_keeps_the_modulation_in_float32():
    model = WanDiT(CFG).cast(torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.time_embedding[0].weight.dtype == torch.float32
    assert model.blocks[0].norm3.weight.dtype == torch.float32
    x, ts, ctx = inputs(b=1, dtype=torch.float32)
    with torch.no_grad():
        out = model(x, ts, ctx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_compiles_without_graph_breaks():
    model = WanDiT(CFG).eval()
    model.set_routing(ROUTING)
    x, ts, ctx = inputs(b=1, dtype=torch.float32)
    model.set_context(ctx[0])
    with torch.no_grad():
        model(x, ts)  # fills the context cache and the plan/rope caches, as inference does
        explanation = torch._dynamo.explain(model)(x, ts)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the routed kernels in bf16)")
def test_routed_model_on_gpu_within_the_tolerance_rule(monkeypatch):
    """bf16 on the GPU kernels vs the float64 dense masked model: error at most 2x that of the same
    model whose attention is plain PyTorch masked SDPA in bf16 (FlashAttention's rule), plus a floor."""
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=2, text_dim=64, text_len=16, freq_dim=64,
                    in_channels=16, out_channels=16)
    routing = [["global", "intra", "window", "intra"], ["window", "global", "window", "intra"]]
    torch.manual_seed(0)
    base = WanDiT(cfg).init_weights()
    state = base.state_dict()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 5, 16, 22, generator=g)  # grid (5, 8, 11)
    ctx = torch.randn(1, 16, 64, generator=g)

    def model(dtype, device):
        m = WanDiT(cfg).eval()
        m.load_state_dict(state)
        m.cast(dtype).to(device)
        return m

    ours = model(torch.bfloat16, "cuda")
    ours.set_routing(routing)
    with torch.no_grad():
        got = ours(x.cuda(), 799.0, ctx.cuda()).double().cpu()
    assert torch.isfinite(got).all()

    def masked(m):
        for block, modes in zip(m.blocks, routing):
            block.self_attn.modes = tuple(ok.Mode.parse(x) for x in modes)
        return m

    monkeypatch.setattr(dit_module.ok, "routed_attention", masked_sdpa_model(routing, (3, 5, 5)))
    with torch.no_grad():
        exact = masked(model(torch.float64, "cpu"))(x.double(), 799.0, ctx.double())
        plain = masked(model(torch.bfloat16, "cuda"))(x.cuda(), 799.0, ctx.cuda()).double().cpu()
    err, base_err = (got - exact).abs().max().item(), (plain - exact).abs().max().item()
    assert err <= 2 * base_err + 1e-3 * exact.abs().max().item(), (err, base_err)


def test_compiled_regions_trace_once_for_all_blocks():
    """Both regions trace without graph breaks (fullgraph), once for every block and plan."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = WanDiT(CFG).eval()
    model.set_routing(ROUTING)  # a different plan in each layer
    x, ts, ctx = inputs(b=1, dtype=torch.float32)
    with torch.no_grad():
        want = model(x, ts, ctx)
        model.compile_regions(backend="eager", fullgraph=True)
        got = model(x, ts, ctx)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.compile_regions(False)
    assert model._regions is None


def loss_and_grads(model, x, ts, ctx):
    """A training step's loss and the parameters' gradients (the model's own float32 math)."""
    model.zero_grad(set_to_none=True)
    loss = model(x, ts, ctx).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_training(got, want):
    """Two ``loss_and_grads`` results the same within float32's rounding of different fusions."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    assert len(got[1]) == len(want[1])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_checkpointing_some_blocks_gives_the_same_gradients():
    """activation_checkpointing as a number of blocks: the first ones recompute, the rest keep their
    activations; the loss and gradients are those of no checkpointing, for every number."""
    model = WanDiT(CFG).train()
    model.set_routing(ROUTING)
    x, ts, ctx = inputs(b=1, dtype=torch.float32)
    calls = [0] * CFG.num_layers  # a checkpointed block starts twice: forward, then recompute in the backward
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    results = {}
    for blocks, runs in ((False, [1, 1]), (1, [2, 1]), (True, [2, 2])):
        model.activation_checkpointing = blocks
        calls[:] = [0] * CFG.num_layers
        results[blocks] = loss_and_grads(model, x, ts, ctx)
        assert calls == runs, (blocks, calls)
    assert model.activation_checkpointing == CFG.num_layers
    for blocks in (1, True):
        assert_same_training(results[blocks], results[False])
    for bad in (3, -1, "all", 1.0):
        with pytest.raises(ValueError, match="activation_checkpointing must be True, False or a number"):
            model.activation_checkpointing = bad


def test_the_whole_model_compiles_for_training():
    """oasis-train's compile = "model" (WanDiT.compile_model): the whole DiT's compute in one graph
    (fullgraph) with checkpointed blocks, compiled once (the caches of plans, RoPE tables and context
    K/V filled outside it: inside a checkpointed block a write is a side effect torch.compile refuses),
    the eager loss and gradients."""
    import copy

    torch._dynamo.reset()
    model = WanDiT(CFG).train()
    model.set_routing(ROUTING)
    model.activation_checkpointing = True
    reference = copy.deepcopy(model)
    x, ts, ctx = inputs(b=1, dtype=torch.float32)

    want = loss_and_grads(reference, x, ts, ctx)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    model.compile_model(fullgraph=True, backend=counter)
    try:
        got = loss_and_grads(model, x, ts, ctx)
        loss_and_grads(model, x, ts, ctx)
        assert counter.frame_count == 1  # no second compile once the caches are filled
    finally:
        model.compile_model(False)
        torch._dynamo.reset()
    assert_same_training(got, want)


def test_compiled_regions_train_as_eager():
    """The compiled regions under autograd (aot_eager: AOTAutograd's forward and backward graphs) with
    activation checkpointing give the eager loss and gradients: what oasis-train's compile = true runs."""
    torch._dynamo.reset()
    model = WanDiT(CFG).train()
    model.set_routing(ROUTING)
    model.activation_checkpointing = True
    x, ts, ctx = inputs(b=1, dtype=torch.float32)
    want = loss_and_grads(model, x, ts, ctx)
    model.compile_regions(backend="aot_eager", fullgraph=True)
    try:
        got = loss_and_grads(model, x, ts, ctx)
    finally:
        model.compile_regions(False)
        torch._dynamo.reset()
    assert_same_training(got, want)
