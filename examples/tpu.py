"""Train a small classifier on scikit-learn's digits on a TPU.

Needs a TPU: a Cloud TPU VM (TensorFlow or JAX: `jax[tpu]`; PyTorch:
`torch_xla[tpu]`), or for TensorFlow a TPU reachable by name or address:

    KERAS_BACKEND=jax python examples/tpu.py
    KERAS_BACKEND=tensorflow python examples/tpu.py --tpu my-tpu-name

Anywhere else it prints what is missing and exits with status 0, so that the
example can run in CI on machines without a TPU.
"""

import argparse
import sys

import keras_strategies as ks


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tpu", default=None, help="TensorFlow: TPU name or grpc:// address")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    return parser.parse_args()


def main():
    args = parse_args()
    try:
        strategy = ks.TPU(tpu=args.tpu)
    except ks.UnsupportedStrategyError as error:
        print(f"This example needs a TPU, and cannot run here: {error}")
        return 0

    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype("int32"), test_size=0.2, random_state=0, stratify=y
    )
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    print(f"strategy: {strategy!r}, replicas in sync: {strategy.num_replicas_in_sync}")
    batch = args.batch_size - args.batch_size % strategy.num_replicas_in_sync
    model.fit(x_train, y_train, batch_size=batch, epochs=args.epochs, verbose=0)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=batch, verbose=0)
    print(f"backend: {keras.backend.backend()}, test loss: {loss:.4f}, test accuracy: {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
