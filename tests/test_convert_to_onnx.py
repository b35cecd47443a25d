"""Tests of m2u_jax.export and its command lines in tools/convert_to_onnx: the export graph,
both backends, the graph passes, parity, the TensorRT check and the ONNX Runtime runner.

The tiny model exports in a few seconds with jax2onnx (plus ~10 s for its plugin import, once);
the jax2tf backend runs once, for a static T = 1 and a dynamic T = 4 graph in one subprocess.
The command-line export (`static_export`, from a run with eval/thresholds.json) and the library
export `dynamic_t4` (no thresholds) are shared by the runner tests.
"""

import contextlib
import inspect
import io
import json
import os
import pathlib
import shutil
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
from m2u_jax import review, run_checkpoint, uncertainty, vit
from m2u_jax.cli import export as convert_cli
from m2u_jax.export import convert, interface, onnx_graph, onnx_runner, parity, trt_check
from m2u_jax.export import graph as export_graph
from m2u_jax.export.jax2tf_export import unflatten_params
from m2u_jax.train_state import TrainState
from tools.convert_to_onnx import infer_onnx as infer_onnx_cli

pytestmark = pytest.mark.slow  # exports ONNX graphs (jax2onnx and the jax2tf subprocess)

SIDE, CHANNELS = 32, 3


@pytest.fixture(scope="module")
def config(tiny_synthetic_root):
    config = tiny.get_config()
    config.data.root = tiny_synthetic_root  # parity images come through the eval pipeline
    return config


def _params_with_boxes(config):
    """Fresh params for `config` with the detection head's biases zeroed: its prior bias keeps
    every box score near 1e-4, below any threshold; without it, scores spread around 0.25 and
    NMS works."""
    params = convert.random_inference_variables(config, seed=3)["params"]
    params["detection_head"] = jax.tree.map(
        lambda leaf: np.zeros_like(leaf) if leaf.ndim == 1 else leaf, params["detection_head"]
    )
    return params


@pytest.fixture(scope="module")
def params(config):
    return _params_with_boxes(config)


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


@pytest.fixture(scope="module")
def line_images(tmp_path_factory):
    """Three 48x48 synthetic PNGs (good, hole, crack) in one folder, sorted by name."""
    from PIL import Image

    from m2u_jax.data import synthetic

    folder = tmp_path_factory.mktemp("line")
    for index, kind in enumerate(["good", "hole", "crack"]):
        image = synthetic.render_sample("metal", kind, index, image_size=48)["image"]
        Image.fromarray(image).save(folder / f"{index}_{kind}.png")
    return folder


def _loaded(folder):
    return np.stack(
        [onnx_runner.load_image(str(p), ("rgb",), SIDE)[0] for p in sorted(folder.iterdir())]
    )


CLASS_NAMES = ["crack", "hole", "pit", "scratch"]  # configs/tiny.py: 4 defect classes


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, workdir, config, params, line_images):
    """A copy of `workdir` with the DIR/eval/thresholds.json eval.py writes (calibrated at
    T = 4, like configs/tiny.py): the score threshold halfway between the two lowest T = 1
    scores of `line_images`, so that a T = 1 export accepts one and rejects two."""
    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(workdir, run)
    scores = np.sort(np.asarray(_reference(config, params, 1)(_loaded(line_images))["image_score"]))
    thresholds = {
        "score_threshold": float((scores[0] + scores[1]) / 2),
        "uncertainty_threshold": 0.00125,
        "uncertainty_measure": "score_var",
        "budget": 0.05,
        "num_mc_samples": 4,
        "image_decision_threshold": 0.2126,
        "mc_decision_threshold": 0.2146,
        "threshold_rule": "f1",
        "target_fpr": 0.05,
        "checkpoint_step": 12,
        "class_names": CLASS_NAMES,
        "policy": "review if uncertainty > uncertainty_threshold, else ...",
    }
    (run / "eval").mkdir()
    (run / "eval" / "thresholds.json").write_text(json.dumps(thresholds))
    return str(run), thresholds


@pytest.fixture(scope="module")
def static_export(tmp_path_factory, calibrated_run):
    """`convert.py --workdir RUN --batch 1 --mc-samples 1 --attention einsum` (T = 1 against
    the run's calibrated T = 4, to see the warning): (path, exit code,
    stderr). Run from an empty folder so the config's relative data.root (data/synthetic) is
    absent even after a `make demo` in the checkout, and parity must fall back to generated
    images."""
    folder = tmp_path_factory.mktemp("static")
    output = str(folder / "static.onnx")
    tiny_config = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.chdir(folder)
        code = convert_cli.main(
            ["--config", tiny_config, "--workdir", calibrated_run[0], "--output", output]
            + ["--batch", "1", "--mc-samples", "1", "--attention", "einsum"]
        )
    return output, code, stderr.getvalue()


_REFERENCES = {}


def _reference(config, params, mc_samples):
    """The jitted JAX inference function (cached: the fixtures are module-wide)."""
    if mc_samples not in _REFERENCES:
        model, export_params = export_graph.build_export_model(config.model, params)
        fn = export_graph.make_inference_fn(model, export_params, num_mc_samples=mc_samples)
        _REFERENCES[mc_samples] = jax.jit(
            lambda images: dict(zip(interface.OUTPUT_NAMES, fn(images)))
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


def test_flips_in_the_graph_average_the_views_and_pass_parity(config, params, images, tmp_path):
    flipped = config.copy_and_resolve_references()
    flipped.model.test_time_flips = 4
    model, export_params = export_graph.build_export_model(flipped.model, params)

    def exported(mc_samples):
        fn = export_graph.make_inference_fn(model, export_params, num_mc_samples=mc_samples)
        return jax.jit(lambda images: dict(zip(interface.OUTPUT_NAMES, fn(images))))

    # T = 1: the graph computes M2UNet.predict with its flips.
    expected = model_lib.predict(
        model_lib.build_model(flipped.model), {"params": params}, jnp.asarray(images)
    )
    outputs = exported(1)(images)
    np.testing.assert_allclose(outputs["anomaly_map"], expected["anomaly_map"], atol=1e-6)
    np.testing.assert_allclose(outputs["image_score"], expected["image_score"], atol=1e-6)
    np.testing.assert_allclose(outputs["boxes"], expected["boxes_xyxy"], atol=1e-4)
    # T = 4: a copy's views share its dropout masks, so the map is the mean over the four views
    # of the flip-free graph's maps, each flipped back; the boxes are the deterministic copy's,
    # merged over the views as predict merges them.
    boxes_t1 = outputs["boxes"]
    outputs = exported(4)(images)
    plain = _reference(config, params, 4)
    maps = [
        plain(images)["anomaly_map"],
        plain(images[:, :, ::-1])["anomaly_map"][:, :, ::-1],
        plain(images[:, ::-1])["anomaly_map"][:, ::-1],
        plain(images[:, ::-1, ::-1])["anomaly_map"][:, ::-1, ::-1],
    ]
    np.testing.assert_allclose(outputs["anomaly_map"], sum(maps) / 4, atol=1e-6)
    assert not np.allclose(outputs["anomaly_map"], maps[0], atol=1e-4)
    np.testing.assert_allclose(outputs["boxes"], boxes_t1, atol=1e-4)
    assert np.all(outputs["uncertainty"] > 1e-7)
    # ONNX with a dynamic batch: the reshapes by the view count keep the batch free.
    output = str(tmp_path / "flips.onnx")
    report = convert.convert(
        flipped, {"params": params}, output, batch=None, mc_samples=4, parity_count=4
    )
    assert report["passed"], report


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
    meta = {"stage": "pretrain", "stage_step": 3}
    run_checkpoint.save(manager, 3, {"params": {"w": np.ones(2)}}, meta)
    manager.close()
    with pytest.raises(ValueError, match="has no finetune checkpoint"):
        convert.load_inference_variables(config, pretrain_dir)
    with pytest.raises(ValueError, match="checkpoint 3 .* is from the pretrain stage"):
        convert.load_inference_variables(config, pretrain_dir, step=3)


def test_the_export_defaults_to_the_calibrated_t(tmp_path):
    # The run directory is the unit: without --mc-samples a run exports at the T its review
    # thresholds were calibrated at (their variance scale depends on T), else T = 1.
    (tmp_path / "eval").mkdir()
    thresholds = tmp_path / "eval" / "thresholds.json"
    assert convert.calibrated_mc_samples(str(tmp_path)) == 1  # not evaluated
    thresholds.write_text(json.dumps({"num_mc_samples": 4}))
    assert convert.calibrated_mc_samples(str(tmp_path)) == 4
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"num_mc_samples": 8}))
    assert convert.calibrated_mc_samples(str(tmp_path), str(other)) == 8
    thresholds.write_text("[1, 2]")  # malformed: named later by calibration_metadata
    assert convert.calibrated_mc_samples(str(tmp_path)) == 1


def test_flatten_params_roundtrip():
    tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros((1, 2))}}, "e": np.arange(3)}
    flat = convert.flatten_params(tree)
    assert sorted(flat) == ["a/b", "a/c/d", "e"]
    jax.tree.map(np.testing.assert_array_equal, unflatten_params(flat), tree)


# ----------------------------------------------------------------------------- jax2onnx


def test_cli_exports_checkpoint_static_batch_with_parity(
    config, params, images, static_export, calibrated_run
):
    output, code, stderr = static_export
    assert code == 0, stderr
    report = json.load(open(output + ".parity.json"))
    assert report["passed"] and report["checker"] == "ok" and not report["tensorrt"]["errors"]
    assert report["images"].startswith("synthetic generator")  # configs/tiny.py data is absent
    model = onnx.load(output)
    assert model.ir_version == 8
    assert [(entry.domain, entry.version) for entry in model.opset_import] == [("", 17)]
    assert model.graph.input[0].name == "images"
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 32, 32, 3]
    assert [value.name for value in model.graph.output] == list(interface.OUTPUT_NAMES)
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
    # The run's calibration travels with the model: read back equal to eval/thresholds.json.
    run, thresholds = calibrated_run
    assert float(metadata["m2u.score_threshold"]) == thresholds["score_threshold"]
    assert float(metadata["m2u.uncertainty_threshold"]) == thresholds["uncertainty_threshold"]
    assert metadata["m2u.uncertainty_measure"] == "score_var"
    assert int(metadata["m2u.review_mc_samples"]) == thresholds["num_mc_samples"]
    assert float(metadata["m2u.review_budget"]) == thresholds["budget"]
    assert metadata["m2u.threshold_rule"] == thresholds["threshold_rule"]
    assert int(metadata["m2u.checkpoint_step"]) == thresholds["checkpoint_step"]
    assert metadata["m2u.checkpoint"] == f"{run} step 12"
    assert metadata["m2u.thresholds_source"] == os.path.join(run, "eval", "thresholds.json")
    assert json.loads(metadata["m2u.class_names"]) == thresholds["class_names"]
    normalization = json.loads(metadata["m2u.normalization"])
    assert normalization["mean"] == [0.5] * 3 and normalization["std"] == [0.5] * 3
    assert normalization["input_range"] == [0.0, 1.0] and normalization["layout"] == "NHWC"
    # (x - 0.5) / 0.5 = 2x - 1 is the network's own normalisation (m2u_jax.vit); if that line
    # changes, so must convert.input_normalization.
    assert "normalised = images.astype(jnp.float32) * 2.0 - 1.0" in inspect.getsource(vit)
    # Calibrated at T = 4, exported at T = 1: the export says the review threshold won't fit.
    (warning,) = [line for line in stderr.splitlines() if line.startswith("WARNING:")][:1]
    assert "calibrated with T=4" in warning and "--mc-samples 1" in warning, stderr
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
        # T=2: the MC path at half the graph of T=4 (jax2tf + tf2onnx time grows with T).
        dict(output=str(tmp_path / "dynamic.onnx"), batch=None, mc_samples=2, fp16=False),
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
        assert [value.name for value in model.graph.output] == list(interface.OUTPUT_NAMES)
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


def _infer(*args):
    return infer_onnx_cli.main([str(arg) for arg in args])


def _records(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_infer_onnx_writes_predictions_with_review_policy(dynamic_t4, line_images, tmp_path):
    onnx_path = dynamic_t4[0]
    expected = _run(onnx_path, _loaded(line_images))
    # Thresholds between the observed values so that each decision occurs once: the most
    # uncertain image goes to review, the higher score of the other two is rejected. Midpoints,
    # not the values themselves: the CLI's batches may round the last bits differently.
    order = np.argsort(expected["uncertainty"])
    thresholds = {
        "score_threshold": float(expected["image_score"][order[:2]].mean()),
        "uncertainty_threshold": float(expected["uncertainty"][order[1:]].mean()),
    }
    # The layout eval.py writes to DIR/eval/thresholds.json.
    eval_file = dict(thresholds, uncertainty_measure="score_var", num_mc_samples=4, budget=0.05)
    (tmp_path / "thresholds.json").write_text(json.dumps(eval_file))
    out = tmp_path / "preds.jsonl"
    code = _infer(
        "--model", onnx_path, "--images", line_images, "--out", out, "--batch-size", 2,
        "--thresholds", tmp_path / "thresholds.json", "--maps-dir", tmp_path / "maps",
    )  # fmt: skip
    assert code == 0
    records = _records(out)
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
    # A library export without a run names its 4 classes class_0..class_3.
    for record in records:
        for box in record["boxes"]:
            assert box["class_name"] == f"class_{box['class']}"
    assert sorted(os.listdir(tmp_path / "maps")) == [
        f"{index}_{kind}_anomaly.png" for index, kind in enumerate(["good", "hole", "crack"])
    ]
    assert records[0]["anomaly_map_png"] == str(tmp_path / "maps" / "0_good_anomaly.png")
    with pytest.raises(ValueError, match="mutual_info"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**thresholds, "uncertainty_measure": "mutual_info"}))
        onnx_runner.load_thresholds(str(bad))


def test_infer_onnx_uses_the_thresholds_stored_in_the_model(
    static_export, calibrated_run, config, params, line_images, tmp_path, capsys
):
    """No --thresholds: the calibrated thresholds and class names the export stored decide."""
    output, code, _ = static_export
    assert code == 0
    _, thresholds = calibrated_run
    info = onnx_runner.model_info(onnx_runner.make_session(output), output)
    assert info["thresholds"] == {
        "score_threshold": thresholds["score_threshold"],
        "uncertainty_threshold": thresholds["uncertainty_threshold"],
        "num_mc_samples": 4,
    }
    assert info["class_names"] == CLASS_NAMES and info["checkpoint_step"] == 12
    assert info["threshold_rule"] == "f1" and info["normalization"]["mean"] == [0.5] * 3
    out = tmp_path / "preds.jsonl"
    assert _infer("--model", output, "--images", line_images, "--out", out) == 0
    captured = capsys.readouterr()
    assert "thresholds from model metadata" in captured.out
    # The model's own T = 1 against the calibrated T = 4: said, not refused.
    assert "calibrated with 4 MC samples" in captured.err
    records = _records(out)
    scores = np.array([r["image_score"] for r in records], np.float32)
    uncertainty = np.array([r["uncertainty"] for r in records], np.float32)
    expected = _reference(config, params, 1)(_loaded(line_images))
    np.testing.assert_allclose(scores, expected["image_score"], atol=1e-5)
    decisions = review.review_policy(scores, uncertainty, thresholds)
    assert [r["decision"] for r in records] == [review.DECISION_NAMES[d] for d in decisions]
    assert sorted(r["decision"] for r in records) == ["accept", "reject", "reject"]
    boxes = [box for record in records for box in record["boxes"]]
    assert boxes and all(box["class_name"] == CLASS_NAMES[box["class"]] for box in boxes)
    # --thresholds still overrides the model's.
    (tmp_path / "t.json").write_text(json.dumps(dict(thresholds, score_threshold=2.0)))
    code = _infer(
        "--model", output, "--images", line_images, "--out", out, "--thresholds",
        tmp_path / "t.json",
    )  # fmt: skip
    assert code == 0 and {r["decision"] for r in _records(out)} == {"accept"}


def test_infer_onnx_refuses_a_model_without_thresholds(dynamic_t4, line_images, tmp_path, capsys):
    onnx_path = dynamic_t4[0]
    out = tmp_path / "preds.jsonl"
    assert _infer("--model", onnx_path, "--images", line_images, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"infer_onnx: {onnx_path} carries no calibrated")
    assert "--thresholds" in err[0] and "python eval.py --workdir" in err[0]
    assert not out.exists()
    # The escape hatch: the documented defaults, with a warning.
    code = _infer("--model", onnx_path, "--images", line_images, "--out", out, "--uncalibrated")
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("WARNING: infer_onnx: --uncalibrated")
    assert "thresholds from uncalibrated defaults" in captured.out
    records = _records(out)
    decisions = review.review_policy(
        [r["image_score"] for r in records],
        [r["uncertainty"] for r in records],
        onnx_runner.DEFAULT_THRESHOLDS,
    )
    assert [r["decision"] for r in records] == [review.DECISION_NAMES[d] for d in decisions]
    with pytest.raises(SystemExit):  # argparse: not both
        _infer("--model", onnx_path, "--images", line_images, "--out", out, "--uncalibrated",
               "--thresholds", "t.json")  # fmt: skip
    capsys.readouterr()
    code = _infer(
        "--model", onnx_path, "--images", line_images, "--out", out, "--uncalibrated",
        "--batch-size", 0,
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["infer_onnx: --batch-size must be >= 1, got 0"]
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got -1"):
        onnx_runner.run(onnx_path, [str(line_images)], str(out), uncalibrated=True, batch_size=-1)


def test_infer_onnx_out_is_atomic_and_maps_keep_the_folder_tree(
    dynamic_t4, line_images, tmp_path, capsys
):
    onnx_path = dynamic_t4[0]
    tree = tmp_path / "tree"
    for folder, source in (("a", "0_good.png"), ("b", "1_hole.png"), ("c", "2_crack.png")):
        (tree / folder).mkdir(parents=True)
        shutil.copy(line_images / source, tree / folder / "x.png")
    # Same-named images in different folders: one map each, at their relative paths.
    out, maps = tmp_path / "preds.jsonl", tmp_path / "maps"
    code = _infer("--model", onnx_path, "--images", tree, "--out", out, "--uncalibrated",
                  "--maps-dir", maps)  # fmt: skip
    assert code == 0
    written = sorted(str(path.relative_to(maps)) for path in maps.rglob("*.png"))
    assert written == ["a/x_anomaly.png", "b/x_anomaly.png", "c/x_anomaly.png"]
    assert [r["anomaly_map_png"] for r in _records(out)] == [str(maps / w) for w in written]
    assert onnx_runner.map_names(["d/x.png", "d/x.npy", "d/e/y.png"]) == [
        "x_png_anomaly.png",
        "x_npy_anomaly.png",
        "e/y_anomaly.png",
    ]
    # A bad image in the middle: the previous result stays, the partial one is kept aside.
    (tree / "b" / "x.png").write_bytes(b"not a png")
    out.write_text("previous\n")
    capsys.readouterr()
    code = _infer("--model", onnx_path, "--images", tree, "--out", out, "--uncalibrated",
                  "--batch-size", 1)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and str(tree / "b" / "x.png") in err.strip().splitlines()[-1]
    assert out.read_text() == "previous\n"
    partial = pathlib.Path(f"{out}.partial")
    assert [r["path"] for r in _records(partial)] == [str(tree / "a" / "x.png")]
    assert f"stopped after 1 of 3 images; their predictions are in {partial}" in err
    assert sorted(os.listdir(tmp_path)) == ["maps", "preds.jsonl", "preds.jsonl.partial", "tree"]
    # A later successful run replaces the file and removes the stale partial result.
    shutil.copy(line_images / "1_hole.png", tree / "b" / "x.png")
    assert _infer("--model", onnx_path, "--images", tree, "--out", out, "--uncalibrated") == 0
    assert len(_records(out)) == 3 and not partial.exists()


def test_infer_onnx_rejects_non_finite_and_out_of_range_arrays(dynamic_t4, tmp_path, capsys):
    good = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    path = tmp_path / "good.npy"
    np.save(path, good)
    image, original = onnx_runner.load_image(str(path), ("rgb",), SIDE)
    assert image.shape == (SIDE, SIDE, 3) and original == (40, 40)
    nan = good.copy()
    nan[3, 4, 1] = np.nan
    nan[5, 6, 0] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ValueError, match=r"nan\.npy: 2 NaN / Inf value\(s\)"):
        onnx_runner.load_image(str(tmp_path / "nan.npy"), ("rgb",), SIDE)
    np.save(tmp_path / "bytes.npy", good * 255.0)  # 0-255 floats would clip to all-white
    with pytest.raises(ValueError, match=r"bytes\.npy: values in \[.*\], outside \[0, 1\]"):
        onnx_runner.load_image(str(tmp_path / "bytes.npy"), ("rgb",), SIDE)
    np.save(tmp_path / "bytes8.npy", (good * 255).astype(np.uint8))  # integer bytes are scaled
    assert onnx_runner.load_image(str(tmp_path / "bytes8.npy"), ("rgb",), SIDE)[0].max() <= 1.0
    code = _infer("--model", dynamic_t4[0], "--images", tmp_path / "nan.npy", "--out",
                  tmp_path / "o.jsonl", "--uncalibrated")  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"infer_onnx: {tmp_path / 'nan.npy'}: 2 NaN / Inf")


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
    assert "--config nope.py: no such config file" in capsys.readouterr().err
    # Without --config the run's config.json is the config: a folder without one is named.
    assert convert_cli.main(["--workdir", str(tmp_path), "--output", "x.onnx"]) == 2
    assert f"{tmp_path}/config.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # random weights have no run to take the config from
        convert_cli.main(["--random-init", "--output", "x.onnx"])
    code = convert_cli.main(
        ["--config", "configs/tiny.py", "--workdir", str(tmp_path), "--output", "x.onnx"]
    )
    assert code == 2 and "train first" in capsys.readouterr().err
    code = convert_cli.main(
        ["--config", "configs/tiny.py", "--random-init", "--output", "x.onnx"]
        + ["--thresholds", "t.json"]
    )
    assert code == 2 and "--thresholds needs --workdir" in capsys.readouterr().err


def test_calibration_metadata_reads_thresholds_and_warns(config, tmp_path):
    model_config = config.model  # 4 defect classes
    run = tmp_path / "run"
    run.mkdir()
    # No DIR/eval/thresholds.json: no thresholds, a loud warning with the fix, fallback names.
    metadata, warnings = convert.calibration_metadata(
        model_config, workdir=str(run), mc_samples=4, checkpoint_step=12
    )
    assert metadata == {"class_names": json.dumps(["class_0", "class_1", "class_2", "class_3"])}
    assert warnings[0].startswith(f"WARNING: {run / 'eval' / 'thresholds.json'} does not exist")
    assert "carries no calibrated thresholds" in warnings[0]
    assert f"python eval.py --workdir {run} --step 12" in warnings[0]
    assert "box classes have no names; boxes are labelled class_0...class_3" in warnings[1]
    # An eval.py file from before class_names, calibrated on another checkpoint, same T.
    thresholds = dict(
        score_threshold=0.2276,
        uncertainty_threshold=0.00125,
        uncertainty_measure="score_var",
        num_mc_samples=4,
        threshold_rule="fpr",
        checkpoint_step=8,
    )
    (run / "eval").mkdir()
    (run / "eval" / "thresholds.json").write_text(json.dumps(thresholds))
    metadata, warnings = convert.calibration_metadata(
        model_config, workdir=str(run), mc_samples=4, checkpoint_step=12
    )
    assert float(metadata["score_threshold"]) == 0.2276
    assert metadata["uncertainty_threshold"] == 0.00125 and metadata["review_mc_samples"] == 4
    assert metadata["threshold_rule"] == "fpr" and metadata["checkpoint_step"] == 8
    assert json.loads(metadata["class_names"]) == ["class_0", "class_1", "class_2", "class_3"]
    assert len(warnings) == 2 and all(line.startswith("WARNING: ") for line in warnings)
    assert "calibrated on checkpoint 8, but checkpoint 12 is exported" in warnings[0]
    assert "records no class_names; boxes are labelled class_0...class_3" in warnings[1]
    # One class: 'defect', silently.
    one_class = model_config.copy_and_resolve_references()
    one_class.num_defect_classes = 1
    metadata, warnings = convert.calibration_metadata(
        one_class, workdir=str(run), mc_samples=4, checkpoint_step=8
    )
    assert json.loads(metadata["class_names"]) == ["defect"] and warnings == []
    # An export with a deep ensemble the calibration did not have (or the other way round).
    _, warnings = convert.calibration_metadata(
        one_class, workdir=str(run), mc_samples=4, checkpoint_step=8, ensemble_members=3
    )
    assert len(warnings) == 1
    assert (
        "calibrated with 1 deep-ensemble member(s) but the graph is exported with 3"
        in (warnings[0])
    )
    # A graph averaging flips the calibration did not have (files before the key: 1 view).
    flipped = one_class.copy_and_resolve_references()
    flipped.test_time_flips = 4
    _, warnings = convert.calibration_metadata(
        flipped, workdir=str(run), mc_samples=4, checkpoint_step=8
    )
    assert warnings == [
        f"WARNING: the thresholds in {run / 'eval' / 'thresholds.json'} were calibrated on "
        "scores averaged over 1 flipped view(s) but the graph averages 4: the score scale "
        "differs; export with --config.model.test_time_flips=1, or recalibrate with "
        f"`python eval.py --workdir {run} --config.model.test_time_flips=4`"
    ]
    # --thresholds FILE overrides the run's file; another T than the export's is a warning.
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(thresholds, score_threshold=0.5, class_names=["crack"])))
    metadata, warnings = convert.calibration_metadata(
        one_class, workdir=str(run), thresholds_path=str(other), mc_samples=8
    )
    assert metadata["score_threshold"] == 0.5 and metadata["thresholds_source"] == str(other)
    assert json.loads(metadata["class_names"]) == ["crack"]
    assert len(warnings) == 1 and "calibrated with T=4" in warnings[0]
    assert "--mc-samples 8" in warnings[0] and "num_mc_samples=8" in warnings[0]
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        convert.calibration_metadata(
            one_class, workdir=str(run), thresholds_path=str(tmp_path / "missing.json")
        )
    other.write_text(json.dumps(dict(thresholds, uncertainty_measure="mutual_info")))
    with pytest.raises(ValueError, match="mutual_info"):
        convert.calibration_metadata(one_class, thresholds_path=str(other))


def test_cli_export_without_thresholds_warns_and_still_exports(
    workdir, tmp_path, monkeypatch, capsys
):
    """A run never evaluated: the export goes ahead (here stopped at the backend) after a
    WARNING line, and the model gets no thresholds."""
    seen = {}

    def fake_convert(config, variables, output, **kwargs):
        seen.update(kwargs["extra_metadata"])
        raise convert.ExportError("stopped here")

    monkeypatch.setattr(convert, "convert", fake_convert)
    code = convert_cli.main(
        ["--config", "configs/tiny.py", "--workdir", workdir, "--output", str(tmp_path / "m.onnx")]
    )
    err = capsys.readouterr().err
    assert code == convert_cli.EXIT_BACKEND and "stopped here" in err
    warning = next(line for line in err.splitlines() if line.startswith("WARNING:"))
    assert "carries no calibrated thresholds" in warning
    assert f"python eval.py --workdir {workdir} --step 12" in warning
    assert "score_threshold" not in seen and seen["checkpoint"] == f"{workdir} step 12"
    assert json.loads(seen["class_names"]) == ["class_0", "class_1", "class_2", "class_3"]


def test_predictors_and_the_predict_command_decide_alike_on_jax_and_onnx(
    calibrated_run, config, dynamic_t4, line_images, tmp_path
):
    from m2u_jax import Predictor
    from m2u_jax.cli import predict

    run, thresholds = calibrated_run
    (pathlib.Path(run) / "config.json").write_text(config.to_json_best_effort())
    on_jax = Predictor.from_workdir(run)  # T = 4 from thresholds.json, the export's masks
    on_onnx = Predictor.from_onnx(dynamic_t4[0], thresholds=thresholds)  # exported at T = 4
    paths = [str(path) for path in sorted(line_images.iterdir())]
    jax_results, onnx_results = on_jax.predict(paths), on_onnx.predict(paths)
    assert [r.decision for r in jax_results] == [r.decision for r in onnx_results]
    np.testing.assert_allclose(
        [r.image_score for r in jax_results], [r.image_score for r in onnx_results], atol=1e-5
    )
    np.testing.assert_allclose(jax_results[1].anomaly_map, onnx_results[1].anomaly_map, atol=1e-5)
    assert jax_results[1].anomaly_map.shape == (48, 48)  # back in the image's pixels
    assert [len(r.boxes) for r in jax_results] == [len(r.boxes) for r in onnx_results]
    expected = review.review_policy(
        [r.image_score for r in jax_results], [r.uncertainty for r in jax_results], thresholds
    )
    assert [r.decision for r in jax_results] == [review.DECISION_NAMES[d] for d in expected]
    for box in (box for r in jax_results for box in r.boxes):
        assert box["class_name"] == CLASS_NAMES[box["class_id"]]
    # The command: same decisions from both backends, one overlay per image, a summary line.
    outputs = {}
    for name, source in (("jax", ["--workdir", run]), ("onnx", ["--onnx", dynamic_t4[0]])):
        extra = [] if name == "jax" else ["--thresholds", f"{run}/eval/thresholds.json"]
        code = predict.main([*source, *extra, "--out", str(tmp_path / name), str(line_images)])
        assert code == 0
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        outputs[name] = [json.loads(line)["decision"] for line in lines]
        assert len(list((tmp_path / name / "overlays").glob("*.png"))) == 3
    assert outputs["jax"] == outputs["onnx"] == [r.decision for r in jax_results]
    # An ONNX model without thresholds and without thresholds= is refused.
    with pytest.raises(ValueError, match="carries no calibrated thresholds"):
        Predictor.from_onnx(dynamic_t4[0])


def test_decoupled_detection_head_exports_with_parity(config, images, tmp_path):
    # cpu_real's head (the class logits from their own branch with its own dropout masks, three
    # 3x3 layers in each branch) plus the optional GroupNorm after every 3x3 conv (off in
    # cpu_real), so one export covers both.
    decoupled = config.copy_and_resolve_references()
    decoupled.model.det_decoupled = True
    decoupled.model.det_branch_convs = 3
    decoupled.model.det_norm_groups = 4
    params = _params_with_boxes(decoupled)
    assert {"cls_conv", "cls_conv_2", "head_conv_2", "head_conv_2_norm"} <= set(
        params["detection_head"]
    )
    model, export_params = export_graph.build_export_model(decoupled.model, params)
    fn = export_graph.make_inference_fn(model, export_params, num_mc_samples=1)
    outputs = dict(zip(interface.OUTPUT_NAMES, jax.jit(fn)(images)))
    expected = model_lib.predict(
        model_lib.build_model(decoupled.model), {"params": params}, jnp.asarray(images)
    )
    np.testing.assert_allclose(outputs["anomaly_map"], expected["anomaly_map"], atol=1e-6)
    assert np.asarray(expected["box_valid"]).any()
    np.testing.assert_allclose(outputs["boxes"], expected["boxes_xyxy"], atol=1e-4)
    report = convert.convert(
        decoupled,
        {"params": params},
        str(tmp_path / "decoupled.onnx"),
        batch=None,
        mc_samples=2,
        parity_count=4,
    )
    assert report["passed"], report


def test_flips_export_stays_finite_for_confident_pixel_logits(config, params, images, tmp_path):
    # A trained head says "normal" with logits far below -89, where e^-x overflows float32: the
    # exported mean-of-views once lowered log σ to -log(1 + e^-x), so the map came out NaN.
    flipped = config.copy_and_resolve_references()
    flipped.model.test_time_flips = 4
    confident = jax.tree.map(np.array, params)
    decoder = confident["anomaly_decoder"]
    out = decoder["pixel_out"] if "pixel_out" in decoder else decoder["out"]
    out["bias"][-1] = -150.0  # the pixel-logit channel
    expected = model_lib.predict(
        model_lib.build_model(flipped.model), {"params": confident}, jnp.asarray(images)
    )
    assert float(np.max(expected["anomaly_map"])) < 1e-38  # σ(x) this small: x below about -87
    output = str(tmp_path / "confident.onnx")
    report = convert.convert(
        flipped, {"params": confident}, output, batch=None, mc_samples=1, parity_count=4
    )
    assert report["passed"], report
    anomaly_map = _run(output, images)["anomaly_map"]
    assert np.all(np.isfinite(anomaly_map))
    np.testing.assert_allclose(anomaly_map, expected["anomaly_map"], atol=1e-6)
