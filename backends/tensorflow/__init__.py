"""TensorFlow implementations: real `tf.distribute` strategies (see `base.py`)."""
