"""The headless trainer, one job per module.

========================  ================================================================================
``trainer``               :class:`LoRATrainer`: the public API and the ``run()`` coroutine, phase by phase
``batches``               token blocks, the per-(seed, epoch) batch order, evaluation batches
``step``                  pure functions of one update: ``forward_loss``, ``train_step``, ``evaluate``
``precision``             autocast, the loss scaler, gradient checkpointing, moving the model and back
``packed_attention``      attention per example in packed rows, from SDPA (switched on for a packed run)
``kbit``                  the k-bit preparation of a quantized base and its undo
``run_state``             one run's progress and what it allocated (optimizer, scaler, batch order)
``ownership``             one model, one owner: which models are training, which adapters a LoRATrainer made
``run_dir``               the run directory: ``config.json``, ``metrics.jsonl``, checkpoints, the adapter
``meter``                 tokens/s, elapsed time without pauses, ETA, device memory and utilisation
``early_stopping``        the pure early-stopping rule (:class:`EarlyStopping`), shared with the HF callback
``stopping``              the rule in the trainer, with the best evaluation's weights kept to be saved
``distributed``           more than one process (DDP): the process group and what every rank decides together
========================  ================================================================================

Failure classification lives in :mod:`lora_widgets.training.diagnosis`, checkpoint files in
:mod:`lora_widgets.training.checkpoint`, learning-rate schedules in :mod:`lora_widgets.training.schedules`. Nothing here
imports the widget stack.
"""
