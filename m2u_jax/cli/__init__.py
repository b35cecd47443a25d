"""The command-line programs (`m2u-train`, `m2u-eval`, `m2u-predict`; also `python train.py`,
`python eval.py` from a checkout). Each module's `run()` is its console-script entry point."""
