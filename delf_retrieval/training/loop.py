"""The training loop both steps share: a distribution strategy (several GPUs -> MirroredStrategy),
mixed precision on GPUs, step-numbered checkpoints with resume, TensorBoard logs, a progress bar."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class LoopConfig:
    """How long and how a model trains; ``steps`` counts from the first run, resumes included."""

    steps: int = 10_000
    batch_size: int = 32  # global: split over the replicas
    learning_rate: float = 0.01
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam"
    momentum: float = 0.9
    schedule: str = "cosine"  # "cosine" (decay to 0 at ``steps``) or "constant"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    mixed_precision: bool | None = None  # None: on when training on a GPU
    progress: bool = True

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")


@dataclass
class LoopResult:
    model: object
    start_step: int  # where this run began (> 0 after a resume)
    step: int  # the last step done
    losses: list = field(default_factory=list)  # per step of this run
    accuracies: list = field(default_factory=list)
    seconds: float = 0.0
    strategy: str = ""
    mixed_precision: bool = False


def make_strategy():
    """MirroredStrategy over all GPUs when there are several, otherwise the default strategy."""
    import tensorflow as tf  # heavy: imported on first use

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


@contextlib.contextmanager
def dtype_policy(name: str):
    """Build layers under a Keras dtype policy ("mixed_float16" on GPUs), then restore the old one."""
    import keras  # heavy: imported on first use

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _optimizer(config: LoopConfig, mixed_precision: bool):
    import keras  # heavy: imported on first use

    rate = config.learning_rate
    if config.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=config.steps)
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(rate)
    else:
        optimizer = keras.optimizers.SGD(rate, momentum=config.momentum)
    return keras.optimizers.LossScaleOptimizer(optimizer) if mixed_precision else optimizer


def _scalar(tag: str, value, step: int) -> None:
    """A TensorBoard scalar written with TF alone (``tf.summary.scalar`` needs the tensorboard
    package; the event is the same: a float tensor tagged for the scalars plugin)."""
    import tensorflow as tf  # heavy: imported on first use
    from tensorflow.core.framework import summary_pb2  # heavy: imported on first use

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=metadata)


def train(build_model, make_dataset, config: LoopConfig, workdir: str, resume: bool = True,
          strategy=None) -> LoopResult:
    """Train ``build_model()`` (a Keras model: images -> logits) on ``make_dataset(start_step,
    start_position)`` (an endless dataset of (images, int labels, int64 stream positions) global
    batches) with softmax cross-entropy, up to ``config.steps``.

    Checkpoints (model, optimizer, step, and the stream position after the last batch, so a resume
    continues exactly where the stream was) go to ``workdir/checkpoints`` every
    ``checkpoint_every`` steps and at the end; with ``resume`` the latest one is restored and the
    run continues from its step. Loss, accuracy and learning rate go to ``workdir/logs``
    (TensorBoard) every ``log_every`` steps. ``strategy`` defaults to :func:`make_strategy`.
    """
    import tensorflow as tf  # heavy: imported on first use
    from tqdm import tqdm  # heavy: imported on first use

    strategy = strategy or make_strategy()
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    mixed = on_gpu if config.mixed_precision is None else config.mixed_precision
    with strategy.scope(), dtype_policy("mixed_float16" if mixed else "float32"):
        model = build_model()
        model(np.zeros((1, 64, 64, 3), np.float32))  # create every variable before listing them
        trainable = model.trainable_variables
        optimizer = _optimizer(config, mixed)
        optimizer.build(trainable)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        position = tf.Variable(-1, dtype=tf.int64, trainable=False, name="position")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, position=position)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, CHECKPOINT_DIR),
                                         max_to_keep=config.keep_checkpoints)
    if resume and manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start = int(step.numpy())
    result = LoopResult(model, start, start, strategy=type(strategy).__name__, mixed_precision=mixed)
    if start >= config.steps:
        return result

    resume_at = int(position.numpy())
    dataset = strategy.experimental_distribute_dataset(make_dataset(start, resume_at if resume_at >= 0 else None))
    global_batch = config.batch_size

    def replica_step(images, labels, positions):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss) if mixed else loss
        gradients = tape.gradient(scaled, trainable)
        optimizer.apply_gradients(zip(gradients, trainable))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), labels), tf.float32))
        return loss, correct, tf.reduce_max(positions)

    @tf.function(input_signature=[dataset.element_spec])
    def train_step(batch):
        loss, correct, last = strategy.run(replica_step, args=batch)
        step.assign_add(1)
        position.assign(tf.reduce_max(tf.stack(strategy.experimental_local_results(last))) + 1)
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None) / global_batch)

    writer = tf.summary.create_file_writer(os.path.join(workdir, LOG_DIR))
    began = time.time()
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not config.progress)
    window_loss, window_acc = [], []
    with writer.as_default():
        for batch in dataset:
            loss, accuracy = train_step(batch)
            done = int(step.numpy())
            loss, accuracy = float(loss), float(accuracy)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {done}; lower the learning rate")
            result.losses.append(loss)
            result.accuracies.append(accuracy)
            window_loss.append(loss)
            window_acc.append(accuracy)
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                _scalar("loss", np.mean(window_loss), done)
                _scalar("accuracy", np.mean(window_acc), done)
                _scalar("learning_rate", np.asarray(optimizer.learning_rate), done)
                bar.set_postfix(loss=f"{np.mean(window_loss):.3f}", acc=f"{np.mean(window_acc):.3f}")
                window_loss, window_acc = [], []
            if done % config.checkpoint_every == 0 or done >= config.steps:
                manager.save(checkpoint_number=done)
            if done >= config.steps:
                break
    writer.flush()
    bar.close()
    result.step = int(step.numpy())
    result.seconds = time.time() - began
    return result
