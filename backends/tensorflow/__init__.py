"""TensorFlow implementations: real `tf.distribute` strategies (see `local.py`)."""
