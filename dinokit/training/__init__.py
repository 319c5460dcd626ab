"""DINO training, one concept per module.

config (TrainConfig), loss (DINOLoss), schedules, ema, optim (parameter groups, clipping, freeze),
data (multi-crop batches), models (student/teacher), precision (fp32/bf16 choice), state
(TrainState and ``step``), checkpoint (Checkpointer), runlog (RunLog), stop (StopPolicy),
callbacks (epoch-end callbacks) and loop (``train()``, the wiring). Nothing here imports
:mod:`dinokit.eval`: the k-NN monitor (:mod:`dinokit.eval.monitor`) is passed in as a callback.
The public function is :func:`dinokit.train`.
"""
