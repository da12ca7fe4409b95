"""MultiWorkerMirrored on scikit-learn's digits: the same script on any backend,
on one machine or several.

    keras-strategies launch --nproc-per-node 2 examples/multi_worker.py
    # or: torchrun --nproc-per-node 2 examples/multi_worker.py
    # several machines: the same command on each, plus
    #   --nnodes 2 --node-rank K --master HOST0:29500
    # SLURM: srun --ntasks 4 python examples/multi_worker.py

Run without a launcher it trains as a single worker.
"""

import argparse

import keras_strategies as ks  # noqa: I001  (before the backend starts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    args = parser.parse_args()

    strategy = ks.MultiWorkerMirrored()  # the cluster comes from the environment

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
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    if strategy.is_chief:
        print(f"strategy: {strategy!r}, replicas in sync: {strategy.num_replicas_in_sync}")
    model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
        distribution=strategy,
    )
    loss, accuracy = model.evaluate(
        x_test, y_test, batch_size=args.batch_size, verbose=0, distribution=strategy
    )
    # every worker holds the same weights and reports the same global metrics
    print(
        f"worker {strategy.worker_index}/{strategy.num_workers}: backend "
        f"{keras.backend.backend()}, test loss {loss:.4f}, test accuracy {accuracy:.4f}"
    )


if __name__ == "__main__":
    main()
