"""Our SAE math against the sae-lens package (an independent implementation).

Every SAELens inference architecture x every ``normalize_activations`` mode is written with
sae-lens' own ``save_model`` (and, for the two modes its trainer applies outside the SAE,
``ActivationScaler.save``), loaded with our loader and compared with sae-lens' ``encode`` /
``decode`` (see ``_oracle.check_against_reference``).
"""

from __future__ import annotations

import pytest
import torch

from sae_runtime import ops, registry
from sae_runtime.loading import load_sae
from tests.sae_runtime._oracle import check_against_reference

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.training.activation_scaler import (  # noqa: E402
    ActivationScaler,
    ActivationWhitening,
)

D_IN, D_SAE = 48, 96  # 48: an awkward width, as sparsify's tests use
SAELENS_ARCHS = ["standard", "jumprelu", "topk", "gated", "abstopk"]
NORMS = ["none", "constant_norm_rescale", "layer_norm", "expected_average_only_in",
         "covariance_whitening"]
# Each architecture runs with one b_dec convention (both are covered across the set).
APPLY_B_DEC = {"standard": True, "jumprelu": False, "topk": True, "gated": False,
               "abstopk": True}
OURS = {"constant_norm_rescale": "token_norm", "layer_norm": "layer_norm",
        "expected_average_only_in": "constant_scale", "covariance_whitening": "none",
        "none": "none"}


def _classes(arch: str):
    return {
        "standard": (sae_lens.StandardSAEConfig, sae_lens.StandardSAE),
        "jumprelu": (sae_lens.JumpReLUSAEConfig, sae_lens.JumpReLUSAE),
        "topk": (sae_lens.TopKSAEConfig, sae_lens.TopKSAE),
        "gated": (sae_lens.GatedSAEConfig, sae_lens.GatedSAE),
        "abstopk": (sae_lens.AbsTopKSAEConfig, sae_lens.AbsTopKSAE),
    }[arch]


def _randomize(ref, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.2 if name.startswith("W") or name == "r_mag" else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        if hasattr(ref, "threshold"):
            ref.threshold.copy_(torch.rand(ref.threshold.shape, generator=g) * 0.6)


def _saelens_sae(arch: str, tmp_path, norm: str = "none", rescale: bool = False, seed: int = 1):
    """A random sae-lens SAE saved with save_model; returns (ref encode, ref decode, path)."""
    cfg_cls, sae_cls = _classes(arch)
    kw = {"k": 7} if arch in ("topk", "abstopk") else {}
    if rescale:
        kw["rescale_acts_by_decoder_norm"] = True
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu",
                  apply_b_dec_to_input=APPLY_B_DEC[arch], normalize_activations=norm, **kw)
    cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    ref = sae_cls(cfg)
    _randomize(ref, seed)
    path = tmp_path / f"{arch}-{norm}"
    ref.save_model(path)
    scaler = ActivationScaler()
    g = torch.Generator().manual_seed(seed + 100)
    if norm == "expected_average_only_in":
        scaler.scaling_factor = 0.6
    elif norm == "covariance_whitening":
        M = torch.eye(D_IN) + 0.1 * torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5
        scaler.whitening = ActivationWhitening(
            mean=torch.randn(D_IN, generator=g) * 0.3, matrix=M, inverse_matrix=torch.linalg.inv(M))
    if norm in ("expected_average_only_in", "covariance_whitening"):
        scaler.save(str(path / "activation_scaler.json"))

    def encode(x):
        return ref.encode(scaler.scale(x))

    def decode(f, x):
        ref.encode(scaler.scale(x))  # sae-lens' per-token output maps are set by encode
        return scaler.unscale(ref.decode(f))

    return encode, decode, path


def _x(n: int = 40, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) + 0.2


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", SAELENS_ARCHS)
def test_matches_sae_lens(arch, norm, tmp_path):
    encode, decode, path = _saelens_sae(arch, tmp_path, norm)
    ours = load_sae(path)
    assert (ours.cfg.architecture, ours.cfg.format) == (arch, "saelens")
    assert (ours.cfg.layer, ours.cfg.site, ours.cfg.normalization) == (2, "resid_post", OURS[norm])
    check_against_reference(ours, _x(), encode, decode)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_rescale_acts_by_decoder_norm_matches_sae_lens(arch, tmp_path):
    """TopK ranking on pre * ||W_dec|| (folded into the weights at load)."""
    encode, decode, path = _saelens_sae(arch, tmp_path, "layer_norm", rescale=True, seed=3)
    check_against_reference(load_sae(path), _x(), encode, decode)


@pytest.mark.parametrize("training_arch", ["batchtopk", "matryoshka_batchtopk", "topk",
                                           "jumprelu"])
def test_training_checkpoints_match_sae_lens_inference_models(training_arch, tmp_path):
    """A TrainingSAE checkpoint loads as what sae-lens saves for inference from it.

    BatchTopK and Matryoshka BatchTopK become JumpReLU with the global threshold; TopK
    training checkpoints rank on decoder-norm-rescaled pre-activations.
    """
    g = torch.Generator().manual_seed(5)
    if training_arch == "batchtopk":
        train = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=5.0, rescale_acts_by_decoder_norm=True))
    elif training_arch == "matryoshka_batchtopk":
        train = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=5.0, matryoshka_widths=[32, D_SAE]))
    elif training_arch == "topk":
        train = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=7))
    else:
        train = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE))
    train.cfg.metadata.hook_name = "blocks.4.hook_mlp_out"
    _randomize(train, 11)
    if hasattr(train, "topk_threshold"):
        train.topk_threshold = torch.tensor(1.2, dtype=torch.double)
    train.save_model(tmp_path / "train")
    train.save_inference_model(tmp_path / "inference")
    ref = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    want_arch = "jumprelu" if "batchtopk" in training_arch else training_arch
    assert ref.cfg.architecture() == want_arch

    def decode(f, x):
        return ref.decode(f)

    for folder in ("train", "inference"):
        ours = load_sae(tmp_path / folder)
        assert (ours.cfg.architecture, ours.cfg.layer, ours.cfg.site) == (want_arch, 4, "mlp_out")
        assert ours.cfg.training_architecture == ("" if want_arch == training_arch
                                                  else training_arch)
        check_against_reference(ours, _x(seed=int(torch.randint(100, (1,), generator=g))),
                                ref.encode, decode)


def test_hand_set_jumprelu_and_topk_exact():
    """Tiny hand-set weights with outputs worked out by hand."""
    from sae_runtime.saes.base import SAE, SAEConfig

    eye = torch.eye(3)
    cfg = SAEConfig("jumprelu", 3, 3, "blocks.1.hook_resid_post", 1, "resid_post")
    sae = SAE(cfg, eye, eye, torch.zeros(3), torch.zeros(3), torch.tensor([0.5, 0.5, 2.0]))
    x = torch.tensor([[1.0, 0.4, 1.5]])
    # feature 0: 1.0 > 0.5 -> 1.0; feature 1: 0.4 <= 0.5 -> 0; feature 2: 1.5 <= 2.0 -> 0
    assert ops.encode(sae, x).tolist() == [[1.0, 0.0, 0.0]]
    tk = SAE(SAEConfig("topk", 3, 3, "blocks.1.hook_resid_post", 1, "resid_post", k=2),
             eye, eye, torch.zeros(3), torch.zeros(3))
    x = torch.tensor([[3.0, -1.0, 2.0]])
    assert ops.encode(tk, x).tolist() == [[3.0, 0.0, 2.0]]
    # clamping feature 1 (not in the top-k: activation 0) to 5 adds 5 * e_1
    d = ops.intervention_delta(tk, x, torch.tensor([[1]]), torch.tensor([[int(ops.Mode.CLAMP)]]),
                               torch.tensor([[5.0]]))
    assert d.tolist() == [[0.0, 5.0, 0.0]]


def test_normalised_edit_is_divided_by_the_input_scale():
    """token_norm: the input is scaled by c = sqrt(d)/||x||, so a clamp adds (v - f) W_dec / c."""
    from sae_runtime.saes.base import SAE, SAEConfig

    eye = torch.eye(4)
    sae = SAE(SAEConfig("standard", 4, 4, "blocks.1.hook_resid_post", 1, "resid_post",
                        normalization="token_norm"), eye, eye, torch.zeros(4), torch.zeros(4))
    x = torch.tensor([[4.0, 0.0, 0.0, 0.0]])  # ||x|| = 4, c = 2 / 4 = 0.5, x_n = (2, 0, 0, 0)
    assert ops.encode(sae, x).tolist() == [[2.0, 0.0, 0.0, 0.0]]
    d = ops.intervention_delta(sae, x, torch.tensor([[0]]), torch.tensor([[int(ops.Mode.CLAMP)]]),
                               torch.tensor([[3.0]]))
    assert d.tolist() == [[2.0, 0.0, 0.0, 0.0]]  # (3 - 2) * e_0 / 0.5


def test_registry_unknown_name_lists_known():
    from sae_runtime.errors import SAEFormatError

    with pytest.raises(SAEFormatError, match="supported: " + ", ".join(registry.names())):
        registry.get("gatedx")


def test_every_registered_architecture_has_a_reference_test():
    """An architecture added to the registry must also get an oracle test here or in
    test_formats.py (sae-lens, sparsify or a published formula)."""
    covered = set(SAELENS_ARCHS) | {"groupmax", "top_afa"}
    assert set(registry.names()) <= covered, set(registry.names()) - covered
