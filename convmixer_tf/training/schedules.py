"""Learning-rate schedules of the paper's recipes."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="convmixer_tf")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """The paper's one-cycle schedule: piecewise linear through (step, lr) points
    (0, 0) → (2/5·total, max_lr) → (4/5·total, max_lr/20) → (total, 0), as in the official
    CIFAR-10 script's `np.interp([t], [0, e*2//5, e*4//5, e], [0, lr_max, lr_max/20, 0])`.
    """

    def __init__(self, max_lr, total_steps, warmup_fraction=0.4, anneal_fraction=0.8,
                 final_div=20.0):
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.warmup_fraction = float(warmup_fraction)
        self.anneal_fraction = float(anneal_fraction)
        self.final_div = float(final_div)

    def __call__(self, step):
        t = ops.cast(step, "float32")
        total = float(max(self.total_steps, 1))
        warm, anneal = self.warmup_fraction * total, self.anneal_fraction * total
        low = self.max_lr / self.final_div
        up = self.max_lr * t / max(warm, 1.0)
        down = self.max_lr + (low - self.max_lr) * (t - warm) / max(anneal - warm, 1.0)
        tail = low * (total - t) / max(total - anneal, 1.0)
        lr = ops.where(t < warm, up, ops.where(t < anneal, down, tail))
        return ops.maximum(lr, 0.0)

    def get_config(self):
        return dict(max_lr=self.max_lr, total_steps=self.total_steps,
                    warmup_fraction=self.warmup_fraction,
                    anneal_fraction=self.anneal_fraction, final_div=self.final_div)
