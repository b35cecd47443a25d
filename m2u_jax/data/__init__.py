"""Data sources, the synthetic MVTec-AD-format generator and the tf.data input pipeline."""
