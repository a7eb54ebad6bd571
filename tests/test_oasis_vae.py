"""oasis.wan_vae.WanVAEDecoder against diffusers' AutoencoderKLWan.decode (same random weights, CPU)."""

import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from oasis import CheckpointError  # noqa: E402
from oasis.vae import WanDecoder, find_vae, load_vae, save_vae  # noqa: E402
from oasis.wan_vae import WanVAEConfig, WanVAEDecoder  # noqa: E402

TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def reference():
    # diffusers' WanUpsample rounds its input to float32 for the nearest-exact resize and back (a no-op
    # for 16-bit inputs, a rounding of float64 ones); ours keeps the dtype, so the float64 comparison
    # runs the plain resize on both sides
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    patch = pytest.MonkeyPatch()
    patch.setattr(wan.WanUpsample, "forward", torch.nn.Upsample.forward)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():  # move every tensor off its initial value so each one matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    yield ref
    patch.undo()


@pytest.fixture(scope="module")
def reference64(reference):
    """A float64 copy (the float32 fixture is never converted in place: one failure would leak)."""
    import copy

    return copy.deepcopy(reference).double()


def ours_from(ref):
    dec = WanVAEDecoder(WanVAEConfig.from_dict(dict(ref.config))).eval().to(ref.dtype)
    dec.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))})
    return dec


@pytest.mark.parametrize("frames", [1, 2, 3, 5])
def test_decoder_matches_diffusers_in_float64(reference64, frames):
    """The same arithmetic: only the layouts of some intermediate tensors differ from diffusers' (which
    changes the CPU convolutions' summation order), so float64 agrees to rounding, ~1e-14."""
    ref = reference64
    ours = ours_from(ref)
    z = torch.randn(2, 16, frames, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        want = ref.decode(z).sample
        for chunk in (None, 1, 2):
            got = ours(z, chunk=chunk)
            assert got.shape == (2, 3, 1 + 4 * (frames - 1), 32, 48)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m: f"chunk {chunk}: {m}")
    assert 0.1 < (want.abs() < 1).float().mean() < 0.99  # not all clamped: the comparison sees values


def test_decoder_float32_close(reference):
    ours = ours_from(reference)
    z = torch.randn(1, 16, 3, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(z, chunk=1), reference.decode(z).sample, rtol=1e-4, atol=1e-4)


def test_load_both_layouts_and_save(tmp_path, reference):
    reference.save_pretrained(str(tmp_path / "vae"))
    assert find_vae(tmp_path) == tmp_path / "vae"
    ours = load_vae(tmp_path / "vae")  # a whole VAE: the encoder's tensors are left out
    z = torch.randn(1, 16, 2, 4, 6)
    with torch.no_grad():
        want = reference.decode(z).sample
        torch.testing.assert_close(ours(z), want)
        theirs = load_vae(tmp_path / "vae", backend="diffusers")
        torch.testing.assert_close(theirs.decode(z).sample, want)
    save_vae(ours, tmp_path / "ours")
    again = load_vae(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(z), want)
    dec = WanDecoder(ours)
    assert (dec.temporal, dec.spatial, dec.z_dim) == (4, 8, 16)


def test_bad_vae_folders(tmp_path, reference):
    with pytest.raises(CheckpointError, match="no Wan VAE"):
        find_vae(tmp_path)
    save_vae(ours_from(reference), tmp_path / "v")
    import safetensors.torch as st

    f = tmp_path / "v" / "diffusion_pytorch_model.safetensors"
    state = st.load_file(str(f))
    state.pop("decoder.conv_in.weight")
    state["decoder.extra"] = torch.zeros(1)
    st.save_file(state, str(f))
    with pytest.raises(CheckpointError) as info:
        load_vae(tmp_path / "v")
    assert "decoder.conv_in.weight" in str(info.value) and "decoder.extra" in str(info.value)
    with pytest.raises(ValueError, match="backend"):
        load_vae(tmp_path / "v", backend="other")
    with pytest.raises(ValueError, match="latents must be"):
        ours_from(reference)(torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="Wan2.2"):
        WanVAEConfig.from_dict({"is_residual": True})


# -- the encoder, channels-last, Wan2.1's names, the fused kernel -------------------------------------------

def full_from(ref):
    from oasis import WanVAE

    vae = WanVAE(WanVAEConfig.from_dict(dict(ref.config))).eval().to(ref.dtype)
    vae.load_state_dict(ref.state_dict())
    return vae


def down3(n):  # three zero-pad-right, 3x3, stride-2 convolutions
    for _ in range(3):
        n = (n - 2) // 2 + 1
    return n


@pytest.mark.parametrize("frames,size", [(1, (16, 24)), (5, (19, 29)), (9, (24, 16))])
def test_encoder_matches_diffusers_in_float64(reference64, frames, size):
    ref = reference64
    ours = full_from(ref)
    x = torch.rand(2, 3, frames, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        for chunk in (None, 1, 2):
            mean, logvar = ours.encode(x, chunk=chunk, moments=True)
            assert mean.shape == dist.mean.shape == (2, 16, 1 + (frames - 1) // 4, *map(down3, size))
            torch.testing.assert_close(mean, dist.mean, rtol=0, atol=1e-12, msg=lambda m: f"chunk {chunk}: {m}")
            torch.testing.assert_close(logvar, dist.logvar, rtol=0, atol=1e-12)
            torch.testing.assert_close(ours.encode(x, chunk=chunk), mean, rtol=0, atol=0)
            for piece in (1, 2, 3):  # the full-resolution layers in pieces of frames: exact
                torch.testing.assert_close(ours.encode(x, chunk=chunk, piece_frames=piece), mean, rtol=0, atol=1e-12)
    assert dist.mean.std() > 0.1  # the comparison sees values


@pytest.mark.parametrize("latent", [(1, 3, 5), (3, 5, 7)])
def test_decoder_odd_latent_sizes(reference64, latent):
    ref = reference64
    ours = ours_from(ref)
    z = torch.randn(1, 16, *latent, dtype=torch.float64)
    with torch.no_grad():
        want = ref.decode(z).sample
        for chunk in (None, 2):
            torch.testing.assert_close(ours(z, chunk=chunk), want, rtol=0, atol=1e-12)


def test_channels_last_same_numbers(reference):
    vae = full_from(reference).double()
    x = torch.rand(1, 3, 5, 16, 24, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 16, 3, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        enc, dec = vae.encode(x, chunk=1), vae.decode(z, chunk=1)
        vae.channels_last()
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(vae.encode(x, chunk=1), enc, rtol=0, atol=1e-12)
        got = vae.decode(z, chunk=1)
        assert got.is_contiguous()
        torch.testing.assert_close(got, dec, rtol=0, atol=1e-12)
        vae.channels_last(False)
        assert vae.decoder.conv_in.weight.is_contiguous()


def test_encode_checks(reference):
    vae = full_from(reference)
    with pytest.raises(ValueError, match="1 \\+ 4k frames, got 6"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="video must be"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="chunk must be"):
        vae.encode(torch.zeros(1, 3, 5, 16, 16), chunk=0)
    with pytest.raises(ValueError, match="without its encoder"):
        ours_from(reference).encode(torch.zeros(1, 3, 5, 16, 16))


def wan21_names(cfg: WanVAEConfig) -> list[str]:
    """Every tensor name of Wan2.1's own VAE module (wan/modules/vae.py) for ``cfg``, written from its
    structure: residual = [norm, SiLU, conv, norm, SiLU, dropout, conv], resample = [pad|upsample, conv]."""
    res = ["residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma", "residual.6.weight",
           "residual.6.bias"]
    conv = ["weight", "bias"]
    names = [f"conv1.{c}" for c in conv] + [f"conv2.{c}" for c in conv]
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    i = 0
    for s, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            names += [f"encoder.downsamples.{i}.{r}" for r in res]
            if cin != cout:
                names += [f"encoder.downsamples.{i}.shortcut.{c}" for c in conv]
            cin, i = cout, i + 1
        if s != len(cfg.dim_mult) - 1:
            names += [f"encoder.downsamples.{i}.resample.1.{c}" for c in conv]
            if cfg.temperal_downsample[s]:
                names += [f"encoder.downsamples.{i}.time_conv.{c}" for c in conv]
            i += 1
    ddims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    i = 0
    for s, (cin, cout) in enumerate(zip(ddims[:-1], ddims[1:])):
        cin = cin // 2 if s else cin
        for _ in range(cfg.num_res_blocks + 1):
            names += [f"decoder.upsamples.{i}.{r}" for r in res]
            if cin != cout:
                names += [f"decoder.upsamples.{i}.shortcut.{c}" for c in conv]
            cin, i = cout, i + 1
        if s != len(cfg.dim_mult) - 1:
            names += [f"decoder.upsamples.{i}.resample.1.{c}" for c in conv]
            if cfg.temperal_downsample[::-1][s]:
                names += [f"decoder.upsamples.{i}.time_conv.{c}" for c in conv]
            i += 1
    for part in ("encoder", "decoder"):
        names += [f"{part}.conv1.{c}" for c in conv] + [f"{part}.head.0.gamma"] + [f"{part}.head.2.{c}" for c in conv]
        names += [f"{part}.middle.{m}.{r}" for m in (0, 2) for r in res]
        names += [f"{part}.middle.1.{n}" for n in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight",
                                                   "proj.bias")]
    return names


@pytest.mark.parametrize("config", [TINY, dict(TINY, num_res_blocks=2, dim_mult=[1, 2, 4, 4])])
def test_wan21_names_map_like_diffusers(config):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from oasis.vae import wan_to_diffusers_names

    cfg = WanVAEConfig.from_dict(config)
    state = {n: torch.zeros(1) for n in wan21_names(cfg)}
    ours = wan_to_diffusers_names(state, cfg)
    if cfg.num_res_blocks == 2:  # diffusers' converter knows Wan2.1's layer numbers, not other depths
        assert sorted(ours) == sorted(convert_wan_vae_to_diffusers(state))
    from oasis import WanVAE

    assert sorted(ours) == sorted(WanVAE(cfg).state_dict())  # every tensor of ours, none left over


def wan21_state(ref) -> dict:
    """``ref``'s tensors under Wan2.1's names (the inverse of the map, found by mapping every name)."""
    from oasis.vae import wan_to_diffusers_names

    cfg = WanVAEConfig.from_dict(dict(ref.config))
    names = wan21_names(cfg)
    to_diffusers = wan_to_diffusers_names({n: n for n in names}, cfg)
    state = ref.state_dict()
    return {wan: state[d] for d, wan in to_diffusers.items()}


@pytest.mark.slow
def test_wan21_pth_loads_in_both_backends(tmp_path):
    """A random full-size VAE written as Wan2.1's ``Wan2.1_VAE.pth``: ours and diffusers' read the same."""
    torch.manual_seed(1)
    ref = diffusers.AutoencoderKLWan().eval()
    torch.save(wan21_state(ref), tmp_path / "Wan2.1_VAE.pth")
    assert find_vae(tmp_path) == tmp_path / "Wan2.1_VAE.pth"
    ours = load_vae(tmp_path / "Wan2.1_VAE.pth")
    theirs = load_vae(tmp_path / "Wan2.1_VAE.pth", backend="diffusers")
    assert ours.has_encoder
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_wan21_pth_tiny_and_errors(tmp_path, reference):
    """The map on a tiny VAE's tensors, then a .pth with a bad name and a missing one: one error, both named."""
    from oasis.vae import wan_to_diffusers_names

    cfg = WanVAEConfig.from_dict(dict(reference.config))
    mapped = wan_to_diffusers_names(wan21_state(reference), cfg)
    for k, v in reference.state_dict().items():
        assert torch.equal(mapped[k], v), k
    state = {n: torch.zeros(1) for n in wan21_names(WanVAEConfig())}
    state.pop("decoder.head.0.gamma")
    state["decoder.unknown.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError) as info:
        load_vae(tmp_path / "Wan2.1_VAE.pth")
    msg = str(info.value)
    assert "decoder.norm_out.gamma" in msg and "decoder.unknown.weight" in msg and "mis-shaped" in msg
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vae(tmp_path / "bad.pth")


def test_encoder_halves_load_and_save(tmp_path, reference):
    reference.save_pretrained(str(tmp_path / "vae"))
    full = load_vae(tmp_path / "vae")
    assert full.has_encoder and full.has_decoder
    assert not load_vae(tmp_path / "vae", encoder=False).has_encoder
    full.save_pretrained(tmp_path / "again")
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_vae(tmp_path / "again").encode(x), reference.encode(x).latent_dist.mean)
    save_vae(ours_from(reference), tmp_path / "dec")
    with pytest.raises(CheckpointError, match="decoder-only"):
        load_vae(tmp_path / "dec", encoder=True)
    with pytest.raises(ValueError, match="encoder must be"):
        load_vae(tmp_path / "dec", encoder="yes")


@pytest.mark.parametrize("layout", ["first", "last", "time slice"])
@pytest.mark.parametrize("channels", [3, 24, 96])
def test_norm_silu_kernel_matches_its_torch_expression(layout, channels):
    pytest.importorskip("triton")
    from oasis.vae_kernels import norm_silu_reference, norm_silu_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(channels)
    gamma = (torch.randn(channels, 1, 1, 1, generator=gen) + 1).to(device, torch.bfloat16)
    x = (torch.randn(2, channels, 5, 6, 7, generator=gen) * 3).to(device, torch.bfloat16)
    x[0, :, 0, 0, 0] = 0  # a zero vector: eps keeps it zero, no NaN
    if layout == "last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    out = torch.full((2, channels, 7, 6, 7), float("nan"), device=device, dtype=torch.bfloat16)
    if layout == "last":
        out = out.contiguous(memory_format=torch.channels_last_3d)
    target = out[:, :, 2:] if layout != "first" else torch.empty_like(x)
    got = norm_silu_triton(x, gamma, channels ** 0.5, out=target)
    assert got.data_ptr() == target.data_ptr()
    if layout != "first":
        assert out[:, :, :2].isnan().all()  # the cache's frames untouched
    assert not got.isnan().any() and got[0, :, 0, 0, 0].abs().max() == 0
    plain = norm_silu_triton(x, gamma, channels ** 0.5, silu=False)
    for out_, silu in ((got, True), (plain, False)):  # FlashAttention's rule: at most 2x torch's own error
        exact = norm_silu_reference(x.double(), gamma.double(), channels ** 0.5, silu)
        ref_err = (norm_silu_reference(x, gamma, channels ** 0.5, silu).double() - exact).abs().max()
        err = (out_.double() - exact).abs().max()
        assert err <= 2 * ref_err + 1e-3, (silu, err, ref_err)


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("last", [False, True])
def test_norm_silu_writes_the_cache_tail(frames, last):
    """``tail``: the result's last frames again (the next call's cache), the same values bit for bit, in
    the kernel (CUDA or the interpreter) and in the torch path; a tail that does not fit is refused."""
    pytest.importorskip("triton")
    from oasis.vae_kernels import norm_silu, norm_silu_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(frames)
    fmt = torch.channels_last_3d if last else torch.contiguous_format
    x = torch.randn(2, 12, 5, 4, 9, generator=gen).to(device, torch.bfloat16).contiguous(memory_format=fmt)
    gamma = torch.rand(12, 1, 1, 1, generator=gen).to(device, torch.bfloat16) + 0.5
    bias = torch.randn(12, generator=gen).to(device, torch.bfloat16)
    k = min(frames, 2)
    for fn in (norm_silu_triton, norm_silu):
        buf = torch.full((2, 12, 7, 4, 9), float("nan"), device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        tail = torch.full((2, 12, k, 4, 9), float("nan"), device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        xs = x[:, :, :frames]
        fn(xs, gamma, 3.5, out=buf[:, :, 2:2 + frames], bias=bias, tail=tail)
        assert torch.equal(tail, buf[:, :, 2 + frames - k:2 + frames]), fn.__name__
        with pytest.raises(ValueError, match="tail must be"):
            fn(xs, gamma, 3.5, out=buf[:, :, 2:2 + frames], tail=torch.empty(2, 12, frames + 1, 4, 9, device=device,
                                                                             dtype=torch.bfloat16))


@pytest.mark.parametrize("group", [1, 2, 3, 5])
def test_latent_size_layers_in_groups_exact(reference64, monkeypatch, group):
    """The layers at the latents' own size run on groups of latent frames (the decoder's head ahead of its
    chunks, the encoder's tail behind them): the diffusers reference in float64 for every group size and chunking,
    a last group shorter than the others included (7 latent frames)."""
    from oasis import wan_vae

    monkeypatch.setattr(wan_vae, "LATENT_STAGE_FRAMES", group)
    ref = reference64
    ours = full_from(ref)
    gen = torch.Generator().manual_seed(group)
    z = torch.randn(1, 16, 7, 4, 5, dtype=torch.float64, generator=gen)
    x = torch.rand(1, 3, 25, 16, 24, dtype=torch.float64, generator=gen) * 2 - 1
    with torch.no_grad():
        want_video, want_mean = ref.decode(z).sample, ref.encode(x).latent_dist.mean
        for chunk, piece in ((None, None), (1, 2), (2, None), (3, 1)):
            torch.testing.assert_close(ours.decode(z, chunk=chunk, piece_frames=piece), want_video,
                                       rtol=0, atol=1e-12, msg=lambda m: f"decode chunk {chunk}: {m}")
            torch.testing.assert_close(ours.encode(x, chunk=chunk, piece_frames=piece), want_mean, rtol=0, atol=1e-12,
                                       msg=lambda m: f"encode chunk {chunk}: {m}")


def test_first_frame_convolved_by_the_last_tap_alone(reference64, monkeypatch):
    """A chunked clip's first call gives each causal 3x3x3 convolution one frame behind two zero frames: only the
    last temporal tap runs, on that frame. Those calls happen (decode and encode, chunk 1), they are the only ones
    with a 1-tap kernel, and the results stay diffusers' in float64."""
    from oasis import wan_vae

    calls = []
    real = wan_vae.conv

    def spy(x, weight, *args, **kwargs):
        if weight.dim() == 5 and weight.shape[3] == 3:
            calls.append((x.shape[2], weight.shape[2]))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(wan_vae, "conv", spy)
    ref = reference64
    ours = full_from(ref)
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(1, 16, 3, 4, 5, dtype=torch.float64, generator=gen)
    x = torch.rand(1, 3, 9, 16, 24, dtype=torch.float64, generator=gen) * 2 - 1
    with torch.no_grad():
        want_video, want_mean = ref.decode(z).sample, ref.encode(x).latent_dist.mean
        for what, run, want in (("decode", lambda: ours.decode(z, chunk=1, piece_frames=2), want_video),
                                ("encode", lambda: ours.encode(x, chunk=1), want_mean)):
            calls.clear()
            torch.testing.assert_close(run(), want, rtol=0, atol=1e-12, msg=lambda m: f"{what}: {m}")
            one_tap = [c for c in calls if c[1] == 1]
            assert one_tap and all(c == (1, 1) for c in one_tap), (what, calls)
            assert any(c[1] == 3 for c in calls), what  # the later calls: all taps, two cached frames in front
        calls.clear()
        ours.decode(z)  # the whole clip at once: its first frame shares the calls of the others
        assert calls and all(c[1] == 3 for c in calls)


@pytest.mark.parametrize("config", [
    dict(dim_mult=[1], temperal_downsample=[]),  # one up block: the head's output a pending sum, split per chunk
    dict(dim_mult=[1, 2], temperal_downsample=[True]),
    dict(dim_mult=[1, 2, 2], temperal_downsample=[True, False]),  # the encoder's tail with a spatial downsampler
])
def test_latent_groups_on_other_configs(monkeypatch, config):
    """Configurations beside Wan2.1's: every group size gives group 1's numbers (the per-chunk path), decode and
    encode with its log-variance, float64."""
    from oasis import WanVAE, wan_vae

    torch.manual_seed(3)
    vae = WanVAE(WanVAEConfig.from_dict(dict(TINY, **config))).double().eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    f = vae.config.spatial_factor
    z = torch.randn(1, 16, 5, 3, 4, dtype=torch.float64)
    x = torch.rand(1, 3, 1 + vae.config.temporal_factor * 4, 2 * f, 3 * f, dtype=torch.float64) * 2 - 1

    def run():
        with torch.no_grad():
            return [vae.decode(z, chunk=1, piece_frames=2), vae.decode(z, chunk=2),
                    *vae.encode(x, chunk=1, moments=True)]

    monkeypatch.setattr(wan_vae, "LATENT_STAGE_FRAMES", 1)
    want = run()
    for group in (2, 3, 5):
        monkeypatch.setattr(wan_vae, "LATENT_STAGE_FRAMES", group)
        for g, w in zip(run(), want):
            assert g.shape == w.shape and g.isfinite().all()
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_decode_pieces_exact_and_tiles_close(reference):
    ours = ours_from(reference).double()
    z = torch.randn(1, 16, 3, 6, 10, dtype=torch.float64)
    with torch.no_grad():
        whole = ours(z)
        for chunk, piece in ((None, 1), (1, 3), (2, 2)):  # pieces split the last two stages in time: exact
            torch.testing.assert_close(ours.decode(z, chunk=chunk, piece_frames=piece), whole, rtol=0, atol=1e-12)
        tiled = ours.decode(z, chunk=1, tile=4, tile_overlap=2)
        assert tiled.shape == whole.shape and tiled.dtype == whole.dtype and tiled.isfinite().all()
        assert torch.equal(ours.decode(z, tile=64), whole)  # a tile larger than the frame: no tiling
        ours.autotune = True  # cuDNN's benchmark flag for the call, restored after
        before = torch.backends.cudnn.benchmark
        torch.testing.assert_close(ours.decode(z), whole, rtol=0, atol=0)
        assert torch.backends.cudnn.benchmark == before
    for bad in (dict(piece_frames=0), dict(tile=-1), dict(tile=4, tile_overlap=4), dict(tile_overlap=True)):
        with pytest.raises(ValueError):
            ours.decode(z, **bad)


def test_tiles_blend_to_the_whole_for_a_local_decoder(reference, monkeypatch):
    """With a decoder whose output pixel depends on its own latent pixel only, tiled = whole exactly:
    the cross-fade weights add up to one everywhere and each tile lands where it belongs."""
    ours = ours_from(reference).double()

    def local(z, chunk, piece, clamp=True):  # 8x nearest upsampling of 3 channels, 4x in time
        y = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
        return torch.cat([y[:, :, :1], y[:, :, 1:].repeat_interleave(4, 2)], dim=2)

    monkeypatch.setattr(ours, "_decode_frames", local)
    z = torch.randn(2, 16, 3, 11, 13, dtype=torch.float64)
    whole = local(z, None, None)
    for tile, overlap in ((4, 2), (5, 0), (7, 3)):
        torch.testing.assert_close(ours.decode(z, tile=tile, tile_overlap=overlap), whole, rtol=0, atol=1e-12)


def test_add_bias_kernel_matches_torch():
    pytest.importorskip("triton")
    from oasis.vae_kernels import add_bias_

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        x = torch.randn(2, 5, 3, 4, 6, generator=gen).to(device, torch.bfloat16).contiguous(memory_format=layout)
        r = torch.randn(2, 5, 3, 4, 6, generator=gen).to(device, torch.bfloat16)
        bias = torch.randn(5, generator=gen).to(device, torch.bfloat16)
        want = (x.double() + bias.double().view(-1, 1, 1, 1) + r.double())
        got = x.clone()
        from oasis import vae_kernels

        if device == "cpu":  # the dispatcher runs torch on the CPU; call the kernel the way CUDA would
            vae_kernels._add_bias_kernel[(2, 2)](got, bias, r, 72, 5, got.stride(0), got.stride(1),
                                                 vae_kernels._flat_stride(got), r.stride(0), r.stride(1),
                                                 vae_kernels._flat_stride(r), HAS_BIAS=True, HAS_RES=True,
                                                 BLOCK_C=8, BLOCK_S=64)
        else:
            add_bias_(got, bias, r)
        assert (got.double() - want).abs().max() <= 2 * (want.abs().max() * 2**-8)


def test_norm_silu_kernel_with_the_producers_bias():
    pytest.importorskip("triton")
    from oasis.vae_kernels import norm_silu_reference, norm_silu_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 24, 3, 5, 6, generator=gen).to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    gamma = (torch.randn(24, 1, 1, 1, generator=gen) + 1).to(device, torch.bfloat16)
    bias = torch.randn(24, generator=gen).to(device, torch.bfloat16)
    exact = norm_silu_reference(x.double(), gamma.double(), 24 ** 0.5, bias=bias.double())
    ref_err = (norm_silu_reference(x, gamma, 24 ** 0.5, bias=bias).double() - exact).abs().max()
    err = (norm_silu_triton(x, gamma, 24 ** 0.5, bias=bias).double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    no_bias = norm_silu_reference(x.double(), gamma.double(), 24 ** 0.5)
    assert (no_bias - exact).abs().max() > 0.1  # the bias matters in this comparison


@pytest.mark.parametrize("layout", ["last", "first"])
@pytest.mark.parametrize("keep", [False, True])
def test_norm_silu_sums_a_residual_blocks_output(layout, keep):
    """The norm pass with a residual (a :class:`oasis.wan_vae.PendingSum`): the same bits as the bias-and-residual
    pass followed by the norm pass, in the Triton kernel (CUDA, or the interpreter) and in the torch fallback; the
    sum written over the convolution's output where it is kept, and nothing written there where it is not."""
    pytest.importorskip("triton")
    from oasis import vae_kernels
    from oasis.vae_kernels import add_bias_, norm_silu, norm_silu_reference, norm_silu_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(9)
    fmt = torch.channels_last_3d if layout == "last" else torch.contiguous_format

    def make(*shape):
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16).contiguous(memory_format=fmt)

    conv, res = make(1, 40, 3, 5, 6), make(1, 40, 3, 5, 6)
    gamma = (torch.randn(40, 1, 1, 1, generator=gen) + 1).to(device, torch.bfloat16)
    bias = torch.randn(40, generator=gen).to(device, torch.bfloat16)
    tail = torch.empty(1, 40, 2, 5, 6, device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
    for kernel in (True, False):
        if kernel:  # the Triton launch, as CUDA runs it (called directly under the interpreter on the CPU)
            want_sum = conv.clone()
            vae_kernels._add_bias_kernel[(1, 1)](want_sum, bias, res, 90, 40, want_sum.stride(0), want_sum.stride(1),
                                                 vae_kernels._flat_stride(want_sum), res.stride(0), res.stride(1),
                                                 vae_kernels._flat_stride(res), HAS_BIAS=True, HAS_RES=True,
                                                 BLOCK_C=64, BLOCK_S=128)
            want = norm_silu_triton(want_sum, gamma, 40 ** 0.5)
            x = conv.clone()
            got_tail = tail.clone()
            got = norm_silu_triton(x, gamma, 40 ** 0.5, bias=bias, residual=res, sum_out=x if keep else None,
                                   tail=got_tail)
        else:  # the fallback, with gradients wanted: the bias pass, then the norm's torch expression
            want_sum = add_bias_(conv.clone(), bias, res)
            want = norm_silu_reference(want_sum, gamma, 40 ** 0.5)
            x = conv.clone()
            got_tail = tail.clone()
            with torch.enable_grad():
                g = gamma.clone().requires_grad_()
                got = norm_silu(x, g, 40 ** 0.5, bias=bias, residual=res, sum_out=x if keep else None,
                                tail=got_tail).detach()
        assert torch.equal(got, want), (kernel, (got.double() - want.double()).abs().max())
        assert torch.equal(got_tail, want[:, :, 1:]), kernel
        assert torch.equal(x, want_sum if keep else conv), kernel
    assert not torch.equal(want, norm_silu(conv, gamma, 40 ** 0.5, bias=bias))  # the residual matters
    with pytest.raises(ValueError, match="only with a residual"):
        norm_silu(conv, gamma, 40 ** 0.5, sum_out=conv)
    with pytest.raises(ValueError, match="residual must be x's shape"):
        norm_silu(conv, gamma, 40 ** 0.5, residual=res[:, :, :2])


@pytest.mark.parametrize("channels_last,chunk,piece", [
    (False, 1, 2), (True, None, None),
    # the other two pairings: under the interpreter each takes ~4 s on 2 cores
    pytest.param(True, 1, 2, marks=pytest.mark.slow), pytest.param(False, None, None, marks=pytest.mark.slow)])
def test_the_triton_passes_inside_the_model(reference, monkeypatch, channels_last, chunk, piece):
    """The fused passes in place (under the interpreter on the CPU): the same numbers as the torch
    expressions in either layout, with chunks and pieces or without; and with gradients wanted the torch path
    runs, so the decoder passes gradients to its latents."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton passes only under the interpreter (conftest sets it without CUDA)")
    from oasis import vae_kernels

    vae = full_from(reference)
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(1, 3, 5, 16, 24, generator=gen) * 2 - 1
    z = torch.randn(1, 16, 2, 3, 4, generator=gen)
    with torch.no_grad():
        want_e, want_d = vae.encode(x, chunk=1, piece_frames=2), vae.decode(z, chunk=1, piece_frames=2)
    calls = []
    real = vae_kernels.norm_silu_triton

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: True)
    monkeypatch.setattr(vae_kernels, "norm_silu_triton", counted)
    vae.channels_last(channels_last)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x, chunk=chunk, piece_frames=piece), want_e, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vae.decode(z, chunk=chunk, piece_frames=piece), want_d, rtol=1e-4, atol=1e-4)
    assert calls, "the Triton pass did not run"
    calls.clear()
    zg = z.clone().requires_grad_()
    vae.decode(zg, chunk=chunk).square().mean().backward()
    assert not calls and zg.grad is not None and zg.grad.abs().sum() > 0 and zg.grad.isfinite().all()


def test_vae_config_and_input_checks(reference):
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAEConfig(temperal_downsample=(False, True))
    with pytest.raises(ValueError, match="dim_mult"):
        WanVAEConfig(dim_mult=())
    with pytest.raises(ValueError, match="z_dim"):
        WanVAEConfig(z_dim=8)  # 16 latent means and stds
    vae = full_from(reference)
    with pytest.raises(ValueError, match="at least 1 frame"):
        vae.decode(torch.zeros(1, 16, 0, 4, 4))
    with pytest.raises(ValueError, match="convert one of them"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="8x8 pixels"):
        vae.encode(torch.zeros(1, 3, 5, 4, 16))
    from oasis.vae_conv import upsample2x_conv3x3
    from oasis.vae_kernels import interleave_phases, interleave_phases_triton

    with pytest.raises(ValueError, match="channels-last"):
        interleave_phases_triton(torch.zeros(1, 8, 3, 3))
    with pytest.raises(ValueError, match=r"\[N, 4 Co, H \+ 1, W \+ 1\].*\(1, 6, 3, 3\)"):
        interleave_phases(torch.zeros(1, 6, 3, 3))
    with pytest.raises(ValueError, match="Co biases"):
        interleave_phases(torch.zeros(1, 8, 3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"3x3 weight.*\(4, 2, 5, 5\)"):
        upsample2x_conv3x3(torch.zeros(1, 2, 3, 3), torch.zeros(4, 2, 5, 5))


def test_diffusers_backend_on_a_decoder_only_folder(tmp_path, reference):
    save_vae(ours_from(reference), tmp_path / "dec")
    theirs = load_vae(tmp_path / "dec", backend="diffusers")
    assert theirs.encoder is None  # not a randomly initialised one
    with pytest.raises(CheckpointError, match="decoder-only"):
        load_vae(tmp_path / "dec", backend="diffusers", encoder=True)
