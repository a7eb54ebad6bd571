"""oasis.wan_vae.WanVAEDecoder against diffusers' AutoencoderKLWan.decode (same random weights, CPU)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from oasis import CheckpointError  # noqa: E402
from oasis.vae import WanDecoder, find_vae, load_vae, save_vae  # noqa: E402
from oasis.wan_vae import WanVAEConfig, WanVAEDecoder  # noqa: E402

TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():  # move every tensor off its initial value so each one matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def ours_from(ref):
    dec = WanVAEDecoder(WanVAEConfig.from_dict(dict(ref.config))).eval()
    dec.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))})
    return dec


@pytest.mark.parametrize("frames", [1, 2, 3, 5])
def test_decoder_is_diffusers_bit_for_bit_in_float64(reference, frames):
    ref = reference.double()
    ours = ours_from(ref).double()
    z = torch.randn(2, 16, frames, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        want = ref.decode(z).sample
        for chunk in (None, 1, 2):
            got = ours(z, chunk=chunk)
            assert got.shape == (2, 3, 1 + 4 * (frames - 1), 32, 48)
            assert torch.equal(got, want), (chunk, (got - want).abs().max())
    assert 0.1 < (want.abs() < 1).float().mean() < 0.99  # not all clamped: the comparison sees values
    reference.float()


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
