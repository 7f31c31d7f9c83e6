import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from anomalab.nets.effnet_lite0 import (
    LEVEL_CHANNELS,
    EfficientNetLite0,
    efficientnet_lite0,
    load_state,
    make_backbone,
    packaged_weights_path,
)


@pytest.fixture(scope="module")
def net():
    return efficientnet_lite0()


def test_architecture_matches_the_packaged_checkpoint():
    state = torch.load(packaged_weights_path(), weights_only=True, map_location="cpu")
    own = EfficientNetLite0().state_dict()
    assert list(state) == list(own)  # same names in the same order
    assert all(state[k].shape == own[k].shape for k in own)
    assert sum(v.numel() for k, v in own.items() if "num_batches" not in k and "running" not in k) == 4_652_008


def test_real_photo_is_classified_as_a_cat(net):
    import skimage.data

    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(img, size=(128, 128), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        probs = net(x).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, top  # ImageNet's domestic cats (tabby ... Egyptian cat)
    assert probs[281:286].sum() > 0.8


def test_features_of_every_level_and_block(net):
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        feats = net.features(x)
        blocks = net.forward_blocks(x)
        early = net.features(x, levels=[2, 4])
    assert [f.shape[1] for f in feats.values()] == list(LEVEL_CHANNELS)
    assert [f.shape[-1] for f in feats.values()] == [32, 32, 16, 8, 4, 4, 2, 2, 2]
    assert len(blocks) == 16 and torch.equal(blocks[-1], feats[8])
    assert set(early) == {2, 4} and torch.equal(early[4], feats[4])
    with pytest.raises(ValueError, match="levels"):
        net.features(x, levels=[0])


def test_gray_input_is_repeated_to_rgb(net):
    g = torch.rand(1, 1, 40, 40)
    with torch.inference_mode():
        assert torch.allclose(net(g), net(g.expand(-1, 3, -1, -1)))


def test_local_weights_load_strictly_and_shape_checked(tmp_path):
    state = {k: v.clone() for k, v in EfficientNetLite0().state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = make_backbone("effnet_lite0", tmp_path / "w.safetensors")
    assert torch.equal(loaded._fc.weight, state["_fc.weight"])
    state["_fc.weight"] = torch.zeros(10, 1280)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_state(EfficientNetLite0(), tmp_path / "bad.safetensors")
    del state["_fc.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_state(EfficientNetLite0(), tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        efficientnet_lite0(tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="unknown backbone"):
        make_backbone("resnet18")
    assert np.isfinite(efficientnet_lite0(None)(torch.rand(1, 3, 32, 32)).detach().numpy()).all()
