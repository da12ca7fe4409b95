"""ParameterServer on scikit-learn's digits: asynchronous training, the same
script on every process of the job, on any backend.

    keras-strategies launch --nproc-per-node 4 --num-ps 1 examples/parameter_server.py
    # a chief, 2 workers and 1 parameter server; or a TF_CONFIG per process
    # with "chief", "worker" and "ps" tasks

The workers compute gradients, the parameter server applies them as they
arrive; the chief runs fit's loop and ends with the trained model.
"""

import argparse

import keras_strategies as ks  # noqa: I001  (before the backend starts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="the batch of one update")
    args = parser.parse_args()

    # a parameter server serves inside this call until the chief is done
    strategy = ks.ParameterServer()

    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype("int32"), test_size=0.2, random_state=0, stratify=y
    )
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    # a worker computes updates inside this call until the chief is done
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=2,
              distribution=strategy)
    # only the chief gets here: its model holds the parameter servers' values
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(
        f"chief: backend {keras.backend.backend()}, {strategy.num_workers} workers and "
        f"{strategy.num_ps} parameter server(s), updates applied {strategy.updates_applied()}, "
        f"by worker {strategy.steps_by_worker}; test loss {loss:.4f}, test accuracy {accuracy:.4f}"
    )


if __name__ == "__main__":
    main()
