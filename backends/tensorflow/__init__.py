"""TensorFlow backend: the strategies are real `tf.distribute` strategies.

Fixes applied around Keras 3.15 (all scoped to runs of our strategies):
- BatchNormalization moving statistics drifted apart between replicas under
  MirroredStrategy (their variables use aggregation NONE). Non-trainable
  floating variables are created with aggregation MEAN, and BatchNormalization
  computes its statistics over the global batch (`synchronized=True`), so every
  replica holds identical values and training equals one device.
- Keras scales each replica's loss by 1/num_replicas, which is wrong for an
  unevenly split (last) batch; each replica's loss is scaled by its share of
  the global batch instead.
- A model built outside `scope()` gets its variables re-created as
  distributed variables for the run, and plain ones afterwards.
"""
