"""Train a small classifier on scikit-learn's digits with CentralStorage.

The variables live on one storage device; each step's batch is split over the
compute devices and the gradients are reduced into the stored variables.
Runs on any Keras backend, on a CPU in seconds:

    KERAS_BACKEND=jax python examples/central_storage.py --devices cpu:0,cpu:1
    KERAS_BACKEND=tensorflow python examples/central_storage.py --devices cpu:0,cpu:1
    KERAS_BACKEND=torch python examples/central_storage.py --devices cpu:0,cpu:1

Without `--devices`, the replicas are every local GPU (or one CPU), and the
variables are on the CPU (or on the GPU when there is exactly one).
"""

import argparse

import keras_strategies as ks  # noqa: I001  (creates CPU replicas before the backend starts)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default=None, help="comma-separated, e.g. cpu:0,cpu:1")
    parser.add_argument("--storage-device", default=None, help="e.g. cpu:0")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    return parser.parse_args()


def main():
    args = parse_args()
    strategy = ks.CentralStorage(
        devices=args.devices.split(",") if args.devices else None,
        storage_device=args.storage_device,
    )

    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype("int32"), test_size=0.2, random_state=0, stratify=y
    )

    keras.utils.set_random_seed(0)
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
    # Pattern 1: the model is an ordinary one before and after; scope() works too.
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
              distribution=strategy)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0,
                                    distribution=strategy)
    print(f"backend: {keras.backend.backend()}, test loss: {loss:.4f}, test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
