"""ONNX export of every registered model family (tiny sizes): the exported graph's logits equal PyTorch's, or the
family is refused up front with the reason; and backend=onnxruntime predicts the labels of backend=torch."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.inference.sliding_window import predict_logits
from medseg.inference.onnx_backend import MAMBA_MAX_TOKENS, OnnxNetwork, export_network, unexportable_reason
from medseg.models import create_model, list_models
from tests.inference.finished_run import export_finished_run
from tests.training_path import tiny_plan

TOLERANCE = 1e-4  # max abs difference of float32 logits, ONNX (onnxruntime, CPU) vs PyTorch (CPU)

# family -> (patch, tiny keys); 3D, except swin_unetr: it needs 64 per axis (five halvings to a bottleneck of 2;
# instance norm needs more than one voxel), cheap only in 2D
EXPORTABLE = {
    "unet": ([16, 16, 16], {}),
    "resenc_unet": ([16, 16, 16], {}),
    "umamba_bot": ([16, 16, 16], {}),  # Mamba in the bottleneck: 8 tokens
    "umamba_enc": ([16, 16, 16], {"mamba_max_tokens": 64}),  # Mamba where stages have <= 64 tokens
    "swin_unetr": ([64, 64], {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}),
    "unetr": ([16, 16, 16], {"feature_size": 4, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2}),
    "unetr_small": ([16, 16, 16], {"feature_size": 4, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2}),
}
REFUSED = {
    "vilu_net": ([16, 16], {"vil_depth": 2, "vil_heads": 2}),  # chunkwise mLSTM: shapes inside the graph
}

@pytest.fixture(scope="module")
def exported(synthetic_root, tmp_path_factory):
    return export_finished_run(synthetic_root, tmp_path_factory)



def test_every_registered_family_is_covered():
    # controls (<family>_control) are their family less a block: no module the family does not have
    assert set(EXPORTABLE) | set(REFUSED) == {n for n in list_models() if not n.endswith("_control")}


def _model(name, patch, keys):
    torch.manual_seed(0)
    return create_model(name, len(patch), 1, 3, plan=tiny_plan(len(patch), patch), **keys).eval()


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_exported_logits_equal_pytorch(name):
    patch, keys = EXPORTABLE[name]
    model = _model(name, patch, keys)
    buffer = io.BytesIO()
    export_network(model, 1, patch, buffer, name)
    session = OnnxNetwork(buffer.getvalue())
    x = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(1))  # batch 2: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x)
    got = session(x)
    assert got.shape == expected.shape == (2, 3, *patch)
    diff = (got - expected).abs().max().item()
    assert diff < TOLERANCE, f"{name}: max abs diff {diff}"


def test_vilu_net_is_refused_with_the_reason_and_really_fails_to_trace():
    patch, keys = REFUSED["vilu_net"]
    model = _model("vilu_net", patch, keys)
    reason = unexportable_reason(model)
    assert reason is not None and "mLSTM" in reason
    with pytest.raises(MedsegError, match="vilu: cannot be exported to ONNX: its chunkwise mLSTM"):
        export_network(model, 1, patch, io.BytesIO(), "vilu")
    with pytest.raises(torch.onnx.errors.SymbolicValueError), warnings.catch_warnings():  # the exporter itself
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, *patch),), io.BytesIO(), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})


def test_mamba_layers_with_too_many_tokens_are_refused():
    model = _model("umamba_enc", [16, 16, 16], {})  # the first stage: 16^3 = 4096 tokens
    with pytest.raises(MedsegError, match=f"a Mamba layer sees 4096 tokens at the patch \\[16, 16, 16\\].*"
                                          f"limited to {MAMBA_MAX_TOKENS}"):
        export_network(model, 1, [16, 16, 16], io.BytesIO(), "umamba_enc")
    assert all(b.config.pscan for b in model.modules() if type(b).__name__ == "MambaBlock")  # scan restored


def test_onnxruntime_backend_predicts_the_torch_labels_on_hippocampus(exported, hippocampus):
    from medseg import Segmenter
    from medseg.datasets.io import read_image
    from tests.inference.finished_run import HIPPOCAMPUS_CASES

    run, _ = exported
    kwargs = dict(device="cpu", mirror_axes=[0])  # mirroring included, two copies to keep it quick
    torch_seg = Segmenter.from_run(run, **kwargs)
    onnx_seg = Segmenter.from_run(run, backend="onnxruntime", **kwargs)
    assert onnx_seg.predictor.precision == "32-true"
    for case in HIPPOCAMPUS_CASES[:2]:
        image, geometry = read_image([hippocampus / "imagesTr" / f"{case}.nii.gz"])
        prepared = torch_seg.predictor.prepare(image, geometry.spacing).groups[0]
        assert prepared.data is not None
        for a, b in zip(torch_seg.predictor.models, onnx_seg.predictor.models):  # float32 sliding-window logits
            logits = [predict_logits(m.model, prepared.data, m.config.patch_size, 0.5, (0,), 2, torch.device("cpu"))
                      for m in (a, b)]
            assert (logits[0] - logits[1]).abs().max().item() < TOLERANCE
        label_torch = torch_seg.predict_array(image, geometry.spacing).label
        assert len(np.unique(label_torch)) > 1
        np.testing.assert_array_equal(label_torch, onnx_seg.predict_array(image, geometry.spacing).label)
