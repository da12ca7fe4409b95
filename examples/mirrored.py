"""Train a small classifier on scikit-learn's digits with Mirrored.

Runs on any Keras backend, on a CPU in seconds:

    KERAS_BACKEND=jax python examples/mirrored.py
    KERAS_BACKEND=tensorflow python examples/mirrored.py --devices cpu:0,cpu:1
    KERAS_BACKEND=torch python examples/mirrored.py

`--devices cpu:0,cpu:1` splits the CPU into two replicas (TensorFlow and JAX);
without it, Mirrored uses every local GPU, or one CPU when there is none.
"""

import argparse

import keras_strategies as ks  # noqa: I001  (creates CPU replicas before the backend starts)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default=None, help="comma-separated, e.g. cpu:0,cpu:1")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    return parser.parse_args()


def main():
    args = parse_args()
    strategy = ks.Mirrored(devices=args.devices.split(",") if args.devices else None)

    import keras
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype("int32"), test_size=0.2, random_state=0, stratify=y
    )

    keras.utils.set_random_seed(0)
    with strategy.scope():  # the tf.distribute idiom; fit(distribution=...) works too
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
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)
    predictions = np.argmax(model.predict(x_test, batch_size=args.batch_size, verbose=0), axis=1)
    print(f"backend: {keras.backend.backend()}, test loss: {loss:.4f}, test accuracy: {accuracy:.4f}")
    print(f"first predictions: {predictions[:10].tolist()} (true: {y_test[:10].tolist()})")


if __name__ == "__main__":
    main()
