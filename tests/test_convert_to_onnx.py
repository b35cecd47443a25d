"""Tests of m2u_jax.export and its command lines in tools/convert_to_onnx: the export graph,
both backends, the graph passes, parity, the TensorRT check and the ONNX Runtime runner.

The tiny model exports in a few seconds with jax2onnx (plus ~10 s for its plugin import, once);
the jax2tf backend runs once, for a static T = 1 and a dynamic T = 4 graph in one subprocess.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import optax
import pytest
from onnx import TensorProto, helper, numpy_helper

from configs import tiny
from m2u_jax import model as model_lib
from m2u_jax import review, run_checkpoint, uncertainty
from m2u_jax.export import convert, onnx_graph, onnx_runner, parity, trt_check
from m2u_jax.export import graph as export_graph
from m2u_jax.export.jax2tf_export import unflatten_params
from m2u_jax.train_state import TrainState
from tools.convert_to_onnx import convert as convert_cli
from tools.convert_to_onnx import infer_onnx as infer_onnx_cli

SIDE, CHANNELS = 32, 3


@pytest.fixture(scope="module")
def config(tiny_synthetic_root):
    config = tiny.get_config()
    config.data.root = tiny_synthetic_root  # parity images come through the eval pipeline
    return config


@pytest.fixture(scope="module")
def params(config):
    """Fresh tiny params with the detection head's biases zeroed: its prior bias keeps every box
    score near 1e-4, below any threshold; without it, scores spread around 0.25 and NMS works."""
    params = convert.random_inference_variables(config, seed=3)["params"]
    params["detection_head"] = jax.tree.map(
        lambda leaf: np.zeros_like(leaf) if leaf.ndim == 1 else leaf, params["detection_head"]
    )
    return params


@pytest.fixture(scope="module")
def images(config):
    from m2u_jax.data import pipeline

    batch = next(pipeline.iterate_eval(config, "test", batch_size=4))
    return batch["images"][:4].astype(np.float32)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, params):
    """A run directory with a fine-tuning checkpoint (step 12) written by run_checkpoint."""
    workdir = str(tmp_path_factory.mktemp("run"))
    state = TrainState.create(params, optax.adamw(1e-3), jax.random.PRNGKey(0), ("loss",))
    manager = run_checkpoint.make_manager(workdir, keep=2)
    meta = {"stage": "finetune", "stage_step": 8, "global_step": 12, "pretrain_method": "simclr"}
    run_checkpoint.save(manager, 12, state, meta)
    manager.wait_until_finished()
    manager.close()
    return workdir


@pytest.fixture(scope="module")
def dynamic_t4(tmp_path_factory, config, params):
    """jax2onnx export with a dynamic batch and T = 4 (shared by several tests)."""
    output = str(tmp_path_factory.mktemp("dyn") / "model.onnx")
    report = convert.convert(
        config, {"params": params}, output, batch=None, mc_samples=4, parity_count=4
    )
    return output, report


_REFERENCES = {}


def _reference(config, params, mc_samples):
    """The jitted JAX inference function (cached: the fixtures are module-wide)."""
    if mc_samples not in _REFERENCES:
        model, export_params = export_graph.build_export_model(config.model, params)
        fn = export_graph.make_inference_fn(model, export_params, num_mc_samples=mc_samples)
        _REFERENCES[mc_samples] = jax.jit(
            lambda images: dict(zip(export_graph.OUTPUT_NAMES, fn(images)))
        )
    return _REFERENCES[mc_samples]


def _run(path, images):
    return parity.run_onnxruntime(parity.onnx_session(path), images)


# ----------------------------------------------------------------------------- export graph


def test_inference_fn_t1_equals_model_predict(config, params, images):
    model = model_lib.build_model(config.model)
    expected = model_lib.predict(model, {"params": params}, jnp.asarray(images))
    outputs = _reference(config, params, 1)(images)
    np.testing.assert_allclose(outputs["anomaly_map"], expected["anomaly_map"], atol=1e-6)
    np.testing.assert_allclose(outputs["image_score"], expected["image_score"], atol=1e-6)
    np.testing.assert_array_equal(outputs["uncertainty"], np.zeros(4, np.float32))
    np.testing.assert_allclose(outputs["boxes"], expected["boxes_xyxy"], atol=1e-4)
    np.testing.assert_array_equal(outputs["box_classes"], expected["box_classes"])
    np.testing.assert_array_equal(outputs["num_boxes"], np.sum(expected["box_valid"], axis=1))
    assert outputs["num_boxes"].dtype == np.int32 and outputs["num_boxes"].min() >= 1


def test_fixed_dropout_applies_the_stored_masks_per_copy():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5)(x, deterministic=False)

    x = np.arange(1, 3 * 2 * 5 + 1, dtype=np.float32).reshape(3 * 2, 5)  # (T + 1) * N rows, T=2
    with export_graph.fixed_dropout(num_samples=2, seed=7):
        y = np.asarray(Net().apply({}, x))
    masks = export_graph.dropout_mask(("Dropout_0",), (5,), 2, 0.5, 7)  # [T, 5]
    expected = x.reshape(3, 2, 5).copy()
    expected[1:] = np.where(masks[:, None], expected[1:] * 2.0, 0.0)
    np.testing.assert_array_equal(y, expected.reshape(6, 5))
    # The same path and seed give the same masks; about half are kept.
    big = export_graph.dropout_mask(("a", "b"), (4000,), 3, 0.25, 1)
    np.testing.assert_array_equal(big, export_graph.dropout_mask(("a", "b"), (4000,), 3, 0.25, 1))
    assert abs(big.mean() - 0.75) < 0.02


def test_inference_fn_mc_statistics_match_uncertainty_module(config, params, images):
    model, export_params = export_graph.build_export_model(config.model, params)
    outputs = _reference(config, params, 4)(images)

    # The same T tail samples, stacked by hand, through m2u_jax.uncertainty's statistics.
    @jax.jit
    def tail_samples(images):
        with export_graph.fixed_dropout(4, 0):
            variables = {"params": export_params}
            tokens, _ = model.apply(variables, images, method=model_lib.M2UNet.trunk)
            return model.apply(
                variables,
                jnp.tile(tokens, (5, 1, 1)),
                image_hw=(SIDE, SIDE),
                train=True,
                method=model_lib.M2UNet.stochastic_tail,
            )[0]

    tails = tail_samples(images)
    samples = {
        key: tails[key].reshape(5, 4, *tails[key].shape[1:])[1:]
        for key in ("pixel_logits", "image_logits", "type_logits")
    }
    stats = uncertainty.sample_statistics(samples, model.score_kwargs)
    np.testing.assert_allclose(outputs["image_score"], stats["score_mean"], atol=1e-6)
    np.testing.assert_allclose(outputs["uncertainty"], stats["score_var"], atol=1e-7)
    np.testing.assert_allclose(outputs["anomaly_map"], stats["map_mean"], atol=1e-6)
    assert np.all(outputs["uncertainty"] > 1e-7)  # dropout really varies the samples
    # Boxes come from the dropout-free copy: the T = 1 boxes.
    deterministic = _reference(config, params, 1)(images)
    np.testing.assert_allclose(outputs["boxes"], deterministic["boxes"], atol=1e-3)
    # An image's outputs do not depend on the rest of its batch.
    alone = _reference(config, params, 4)(images[2:3])
    np.testing.assert_allclose(alone["uncertainty"], outputs["uncertainty"][2:3], rtol=1e-4)
    np.testing.assert_allclose(alone["anomaly_map"], outputs["anomaly_map"][2:3], atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints


def test_load_inference_variables_restores_params_and_rejects_bad_runs(
    config, params, workdir, tmp_path
):
    restored = convert.load_inference_variables(config, workdir)["params"]
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    with pytest.raises(ValueError, match="step 5 is not in"):
        convert.load_inference_variables(config, workdir, step=5)
    with pytest.raises(FileNotFoundError, match="train first"):
        convert.load_inference_variables(config, str(tmp_path / "empty"))
    pretrain_dir = str(tmp_path / "pretrain")
    manager = run_checkpoint.make_manager(pretrain_dir, keep=1, async_save=False)
    run_checkpoint.save(manager, 3, {"params": {"w": np.ones(2)}}, {"stage": "pretrain"})
    manager.close()
    with pytest.raises(ValueError, match="has no finetune checkpoint"):
        convert.load_inference_variables(config, pretrain_dir)
    with pytest.raises(ValueError, match="checkpoint 3 .* is from the pretrain stage"):
        convert.load_inference_variables(config, pretrain_dir, step=3)


def test_flatten_params_roundtrip():
    tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros((1, 2))}}, "e": np.arange(3)}
    flat = convert.flatten_params(tree)
    assert sorted(flat) == ["a/b", "a/c/d", "e"]
    jax.tree.map(np.testing.assert_array_equal, unflatten_params(flat), tree)


# ----------------------------------------------------------------------------- jax2onnx


def test_cli_exports_checkpoint_static_batch_with_parity(
    config, params, workdir, images, tmp_path, monkeypatch
):
    output = str(tmp_path / "static.onnx")
    # Run from an empty folder so the config's relative data.root (data/synthetic) is absent even
    # after a `make demo` in the checkout, and parity must fall back to generated images.
    tiny_config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    monkeypatch.chdir(tmp_path)
    code = convert_cli.main(
        ["--config", tiny_config, "--workdir", workdir, "--output", output, "--batch", "1"]
        + ["--attention", "einsum"]
    )
    assert code == 0
    report = json.load(open(output + ".parity.json"))
    assert report["passed"] and report["checker"] == "ok" and not report["tensorrt"]["errors"]
    assert report["images"].startswith("synthetic generator")  # configs/tiny.py data is absent
    model = onnx.load(output)
    assert model.ir_version == 8
    assert [(entry.domain, entry.version) for entry in model.opset_import] == [("", 17)]
    assert model.graph.input[0].name == "images"
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 32, 32, 3]
    assert [value.name for value in model.graph.output] == list(export_graph.OUTPUT_NAMES)
    types = [value.type.tensor_type.elem_type for value in model.graph.output]
    assert types == [TensorProto.FLOAT] * 5 + [TensorProto.INT32] * 2
    equations = [
        helper.get_attribute_value(node.attribute[0]).decode()
        for node in model.graph.node
        if node.op_type == "Einsum"
    ]
    assert "bqhd,bkhd->bhqk" in equations and not any("..." in eq for eq in equations)
    assert not any(node.op_type in ("Dropout", "Resize") for node in model.graph.node)
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert metadata["m2u.mc_samples"] == "1" and metadata["m2u.modalities"] == "rgb"
    assert metadata["m2u.attention"] == "einsum"
    # Our own comparison, on the pipeline images, against JAX with the default (matmul)
    # attention: the einsum graph in ONNX Runtime equals it to ~1e-6.
    expected = _reference(config, params, 1)(images[:1])
    actual = _run(output, images[:1])
    np.testing.assert_allclose(actual["anomaly_map"], expected["anomaly_map"], atol=1e-5)
    np.testing.assert_allclose(actual["image_score"], expected["image_score"], atol=1e-5)
    np.testing.assert_allclose(actual["boxes"], expected["boxes"], atol=1e-3)
    np.testing.assert_array_equal(actual["num_boxes"], expected["num_boxes"])


def test_dynamic_batch_t4_export_passes_parity(dynamic_t4, config, params, images):
    output, report = dynamic_t4
    assert report["passed"], report
    assert report["images"].startswith("test split of")
    batches = report["parity"]["batches"]
    assert [batch["batch_size"] for batch in batches] == [1, 4]
    for batch in batches:
        assert max(batch["max_abs_diff"].values()) <= 1e-4
        assert batch["boxes"]["unmatched"] == 0
        assert batch["boxes"]["matched"] == sum(batch["jax_num_boxes"]) > 0
    model = onnx.load(output)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # Default attention form: batched MatMuls, no attention Einsum left in the graph.
    equations = [
        helper.get_attribute_value(node.attribute[0]).decode()
        for node in model.graph.node
        if node.op_type == "Einsum"
    ]
    assert "bqhd,bkhd->bhqk" not in equations and "bhqk,bkhd->bqhd" not in equations
    assert sum(node.op_type == "MatMul" for node in model.graph.node) >= 4
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert metadata["m2u.attention"] == "matmul"
    # The NMS is one Loop of fixed-point updates (a MatMul each), stopped by its condition.
    (loop,) = [node for node in model.graph.node if node.op_type == "Loop"]
    body = helper.get_attribute_value(loop.attribute[0])
    assert loop.input[1] and any(node.op_type == "MatMul" for node in body.node)
    actual = _run(output, images[:3])  # a batch size parity did not use
    expected = _reference(config, params, 4)(images[:3])
    np.testing.assert_allclose(actual["uncertainty"], expected["uncertainty"], atol=1e-6)
    assert np.all(actual["uncertainty"] > 1e-7)


def test_fp16_export_within_documented_tolerance(config, params, images, tmp_path, dynamic_t4):
    output = str(tmp_path / "fp16.onnx")
    report = convert.convert(config, {"params": params}, output, batch=2, mc_samples=4, fp16=True)
    assert report["passed"], report
    diffs = report["parity"]["batches"][0]["max_abs_diff"]
    assert 1e-6 < diffs["anomaly_map"] <= parity.FP16_TOLERANCE["anomaly_map"]
    model = onnx.load(output)
    weights = [init for init in model.graph.initializer if init.data_type == TensorProto.FLOAT16]
    stored_fp16 = sum(numpy_helper.to_array(init).size for init in weights)
    assert stored_fp16 >= 0.8 * sum(leaf.size for leaf in jax.tree.leaves(params))
    assert os.path.getsize(output) < 0.7 * os.path.getsize(dynamic_t4[0])
    assert not trt_check.errors(trt_check.check_model(model))  # no CastLike, constant kernels


# ----------------------------------------------------------------------------- jax2tf


def test_jax2tf_backend_static_and_dynamic_in_one_subprocess(config, params, tmp_path):
    if not convert.JAX2TF_PYTHON.exists():
        pytest.skip("needs .venv-jax2tf (make setup-jax2tf)")
    jobs = [
        dict(output=str(tmp_path / "static.onnx"), batch=2, mc_samples=1, fp16=False),
        dict(output=str(tmp_path / "dynamic.onnx"), batch=None, mc_samples=4, fp16=False),
    ]
    reports = convert.convert_many(config, {"params": params}, jobs, backend="jax2tf")
    for job, report in zip(jobs, reports):
        assert report["passed"], report
        assert report["backend_report"]["jax_version"] == "0.7.1"
        saved_model = report["saved_model_parity"]
        assert saved_model["passed"] and max(saved_model["max_abs_diff"].values()) <= 1e-4
        assert os.path.isfile(os.path.join(report["saved_model"], "saved_model.pb"))
        for batch in report["parity"]["batches"]:
            assert max(batch["max_abs_diff"].values()) <= 1e-4
            assert batch["boxes"]["matched"] == sum(batch["jax_num_boxes"])
        model = onnx.load(job["output"])
        assert model.ir_version == 8
        assert [value.name for value in model.graph.output] == list(export_graph.OUTPUT_NAMES)
    assert reports[1]["parity"]["batches"][1]["max_abs_diff"]["uncertainty"] <= 1e-6


# ----------------------------------------------------------------------------- graph passes


def _tiny_graph_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def test_finalize_fixes_reductions_castlike_constants_and_prunes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4])
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),  # opset-18 form
        helper.make_node("Transpose", ["kernel"], ["kernel_t"], perm=[1, 0]),
        helper.make_node("Cast", ["kernel_t"], ["kernel_16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["kernel_16"], ["kernel_32"], to=TensorProto.FLOAT),
        helper.make_node("CastLike", ["mean", "x"], ["mean_like"]),
        helper.make_node("MatMul", ["mean_like", "kernel_32"], ["projected"]),
        helper.make_node("Neg", ["x"], ["unused"]),  # dead
    ]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "axes")]
    inits.append(numpy_helper.from_array(kernel, "kernel"))
    output = helper.make_tensor_value_info("projected", TensorProto.FLOAT, ["n", 2])
    model = _tiny_graph_model(nodes, [x], [output], inits)
    # The passes of onnx_graph.finalize (which also renames the I/O to the export contract).
    onnx_graph._reduce_axes_to_attributes(model.graph)
    onnx_graph._clear_value_info(model.graph)
    onnx_graph._cast_like_to_cast(model)
    onnx_graph._fold_constants(model.graph)
    onnx_graph._prune(model.graph)
    model.ir_version = 8
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["ReduceMean", "Cast", "MatMul"]  # folded, CastLike → Cast, Neg pruned
    assert helper.get_attribute_value(model.graph.node[0].attribute[-1]) == [2]
    assert {init.name for init in model.graph.initializer} == {"kernel_32"}
    values = np.random.default_rng(0).random((2, 3, 4), np.float32)
    (result,) = parity.run_onnxruntime(
        parity.onnx_session(model.SerializeToString()), values
    ).values()
    np.testing.assert_allclose(result, values.mean(axis=2) @ kernel.T, rtol=1e-6)


def test_rename_outputs_gives_constant_outputs_a_node():
    """tf2onnx names outputs after TF tensors and may turn a constant output (the T = 1
    uncertainty) into an initializer, which ONNX does not allow as a graph output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("t:0", "t_1:0")]
    zeros = numpy_helper.from_array(np.zeros(2, np.float32), "t_1:0")
    model = _tiny_graph_model([helper.make_node("Neg", ["x"], ["t:0"])], [x], outputs, [zeros])
    model.ir_version = 8
    onnx_graph.rename_outputs(model.graph, {"t:0": "negated", "t_1:0": "zeros"})
    onnx.checker.check_model(model)
    result = _run(model.SerializeToString(), np.array([1.0, -2.0], np.float32))
    np.testing.assert_array_equal(result["negated"], [-1.0, 2.0])
    np.testing.assert_array_equal(result["zeros"], [0.0, 0.0])


# ----------------------------------------------------------------------------- TensorRT check


def test_trt_check_flags_what_tensorrt_rejects():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4, 5])
    k = numpy_helper.from_array(np.array([5000], np.int64), "k")
    nodes = [
        helper.make_node("Einsum", ["a", "a"], ["e"], equation="...ij,...kj->...ik"),
        helper.make_node("Einsum", ["a"], ["d"], equation="bhii->bhi"),
        helper.make_node("TopK", ["a", "k"], ["values", "indices"], axis=-1),
        helper.make_node("BitShift", ["indices", "indices"], ["shifted"], direction="LEFT"),
        helper.make_node("Cast", ["indices"], ["as_int32"], to=TensorProto.INT32),
        helper.make_node("ArgMax", ["as_int32"], ["argmax"], axis=1),
        helper.make_node("Loop", ["", ""], [], body=helper.make_graph([], "body", [], [])),
    ]
    outs = [
        helper.make_tensor_value_info(n, 0, None) for n in ("e", "d", "values", "shifted", "argmax")
    ]
    model = _tiny_graph_model(nodes, [a], outs, [k], opset=18)
    findings = trt_check.check_model(model, "8.5")
    messages = [str(finding) for finding in trt_check.errors(findings)]
    text = "\n".join(messages)
    assert "opset 18 > 17" in text and "IR version 10 > 8" in text
    assert "uses an ellipsis" in text and "repeats an index" in text
    assert "K=5000 >= 3840" in text and "BitShift" in text
    assert "ArgMax" in text and "FP32/FP16 inputs only" in text
    assert any("Loop" in str(f) and f.severity == "warning" for f in findings)
    # Operators by version: LayerNormalization from 8.6, CastLike from 10.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    norm = helper.make_node("LayerNormalization", ["x", "scale"], ["y"])
    like = helper.make_node("CastLike", ["y", "x"], ["z"])
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    model = _tiny_graph_model([norm, like], [x], [out], [scale])
    model.ir_version = 8
    unsupported = lambda trt: sorted(
        f.op_type for f in trt_check.errors(trt_check.check_model(model, trt))
    )
    assert unsupported("8.5") == ["CastLike", "LayerNormalization"]
    assert unsupported("8.6") == ["CastLike"]
    assert unsupported("10") == []
    resize = helper.make_node("Resize", ["x", "", "s"], ["r"], mode="cubic", antialias=1)
    scales = numpy_helper.from_array(np.ones(2, np.float32), "s")
    model = _tiny_graph_model(
        [resize], [x], [helper.make_tensor_value_info("r", 1, None)], [scales]
    )
    text = "\n".join(str(f) for f in trt_check.check_model(model, "10"))
    assert "antialiased resize" in text and "'cubic'" in text


# ----------------------------------------------------------------------------- parity rules


def _outputs(boxes, scores, classes, num, score=0.3):
    return dict(
        anomaly_map=np.zeros((1, 4, 4), np.float32),
        image_score=np.array([score], np.float32),
        uncertainty=np.zeros(1, np.float32),
        boxes=np.array([boxes], np.float32),
        box_scores=np.array([scores], np.float32),
        box_classes=np.array([classes], np.int32),
        num_boxes=np.array([num], np.int32),
    )


def test_compare_outputs_matches_boxes_and_fails_on_real_differences():
    box = [[0, 0, 10, 10], [20, 20, 30, 30]]
    reference = _outputs(box, [0.9, 0.25005], [1, 2], 2)
    # The second box sits on the 0.25 threshold: ONNX dropping it is only "borderline".
    candidate = _outputs([[0, 0, 10, 10.05], [0, 0, 0, 0]], [0.90001, 0.0], [1, 0], 1)
    report = parity.compare_outputs(reference, candidate, fp16=False, score_threshold=0.25)
    assert report["passed"]
    assert report["boxes"]["matched"] == 1 and report["boxes"]["borderline"] == 1
    assert report["boxes"]["min_iou"] == pytest.approx(100 / 100.5)
    wrong_class = _outputs(box, [0.9, 0.25005], [0, 2], 2)
    report = parity.compare_outputs(reference, wrong_class, fp16=False, score_threshold=0.25)
    assert not report["passed"] and report["boxes"]["unmatched"] == 2  # missing + extra
    shifted = _outputs(box, [0.9, 0.25005], [1, 2], 2, score=0.3002)
    report = parity.compare_outputs(reference, shifted, fp16=False, score_threshold=0.25)
    assert not report["passed"]
    assert report["max_abs_diff"]["image_score"] == pytest.approx(2e-4, rel=1e-3)
    assert parity.compare_outputs(reference, shifted, fp16=True, score_threshold=0.25)["passed"]
    nan = _outputs(box, [0.9, 0.25005], [1, 2], 2, score=np.nan)
    assert not parity.compare_outputs(reference, nan, fp16=True, score_threshold=0.25)["passed"]


# ----------------------------------------------------------------------------- runner


def test_infer_onnx_writes_predictions_with_review_policy(dynamic_t4, config, params, tmp_path):
    from PIL import Image

    from m2u_jax.data import synthetic

    folder = tmp_path / "line"
    folder.mkdir()
    for index, kind in enumerate(["good", "hole", "crack"]):
        image = synthetic.render_sample("metal", kind, index, image_size=48)["image"]
        Image.fromarray(image).save(folder / f"{index}_{kind}.png")
    onnx_path = dynamic_t4[0]
    expected = _run(
        onnx_path,
        np.stack(
            [onnx_runner.load_image(str(p), ("rgb",), SIDE)[0] for p in sorted(folder.iterdir())]
        ),
    )
    # Thresholds between the observed values so that each decision occurs once: the most
    # uncertain image goes to review, the higher score of the other two is rejected.
    order = np.argsort(expected["uncertainty"])
    thresholds = {
        "score_threshold": float(expected["image_score"][order[:2]].max()),
        "uncertainty_threshold": float(expected["uncertainty"][order[1:]].mean()),
    }
    # The layout eval.py writes to DIR/eval/thresholds.json.
    eval_file = dict(thresholds, uncertainty_measure="score_var", num_mc_samples=4, budget=0.05)
    (tmp_path / "thresholds.json").write_text(json.dumps(eval_file))
    out = tmp_path / "preds.jsonl"
    code = infer_onnx_cli.main(
        [
            "--model",
            onnx_path,
            "--images",
            str(folder),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--thresholds",
            str(tmp_path / "thresholds.json"),
            "--maps-dir",
            str(tmp_path / "maps"),
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [os.path.basename(r["path"]) for r in records] == [
        "0_good.png",
        "1_hole.png",
        "2_crack.png",
    ]
    np.testing.assert_allclose(
        [r["image_score"] for r in records], expected["image_score"], atol=1e-6
    )
    decisions = review.review_policy(expected["image_score"], expected["uncertainty"], thresholds)
    assert [r["decision"] for r in records] == [review.DECISION_NAMES[d] for d in decisions]
    assert sorted(r["decision"] for r in records) == ["accept", "reject", "review"]
    first = records[0]
    assert first["num_boxes"] == int(expected["num_boxes"][0]) == len(first["boxes"])
    np.testing.assert_allclose(
        first["boxes"][0]["box"], expected["boxes"][0, 0] * 48 / 32, atol=0.01
    )
    assert len(os.listdir(tmp_path / "maps")) == 3
    with pytest.raises(ValueError, match="mutual_info"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**thresholds, "uncertainty_measure": "mutual_info"}))
        onnx_runner.load_thresholds(str(bad))


def test_onnx_runner_imports_without_jax():
    code = "import sys, m2u_jax.export.onnx_runner; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_onnx_images_per_sec_measures_and_validates_shapes(dynamic_t4):
    rate = onnx_runner.onnx_images_per_sec(dynamic_t4[0], 2, SIDE, CHANNELS, repeats=2)
    assert rate > 0
    with pytest.raises(ValueError, match="takes 32x32x3 images"):
        onnx_runner.onnx_images_per_sec(dynamic_t4[0], 2, 64, CHANNELS, repeats=1)


def test_cli_reports_bad_inputs(tmp_path, capsys):
    assert convert_cli.main(["--config", "nope.py", "--random-init", "--output", "x.onnx"]) == 2
    assert "nope.py does not exist" in capsys.readouterr().err
    code = convert_cli.main(
        ["--config", "configs/tiny.py", "--workdir", str(tmp_path), "--output", "x.onnx"]
    )
    assert code == 2 and "train first" in capsys.readouterr().err
