"""Safe loading: weight files are read without pickle, and corrupt model files give a clear
error naming the file instead of a traceback from deep inside a library."""

import numpy as np
import pytest

from m2u_jax import checkpoint


def _tiny_params():
    return {"backbone": {"embedding": {"kernel": np.zeros((8, 8, 3, 16), np.float32)}}}


def test_object_array_npz_is_rejected_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = {"a pickled": "object"}  # np.load would need pickle to rebuild this
    np.savez(path, **{"embedding/kernel": payload})
    with pytest.raises(ValueError) as error:
        checkpoint.load_vit_npz(str(path), _tiny_params())
    message = str(error.value)
    assert message.startswith(f"ViT checkpoint {path} is not a readable .npz file"), message
    assert "allow_pickle=False" in message, message


def test_truncated_and_missing_npz_are_named(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **{"embedding/kernel": np.ones((8, 8, 3, 16), np.float32)})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"^ViT checkpoint {truncated} is not a readable .npz"):
        checkpoint.load_vit_npz(str(truncated), _tiny_params())
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match=rf"^ViT checkpoint {missing} does not exist"):
        checkpoint.load_vit_npz(str(missing), _tiny_params())


def test_corrupt_onnx_model_gives_a_clear_error(tmp_path, capsys):
    from PIL import Image

    from tools.convert_to_onnx import infer_onnx

    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07garbage, not a protobuf ModelProto\xff\xff")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = infer_onnx.main(
        ["--model", str(model), "--images", str(image), "--out", str(tmp_path / "o.jsonl")]
    )
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("infer_onnx: ") and str(model) in last, last
