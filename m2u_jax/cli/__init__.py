"""The command-line programs: `m2u-train`, `m2u-eval`, `m2u-export`, `m2u-predict`, `m2u-data`
(in a checkout also `python train.py`, `python eval.py`, `python tools/convert_to_onnx/
convert.py`). Each module's `run()` is its console-script entry point."""
