"""The training wing: the config, the job (`train.train`), its data, augmentation, schedule,
strategies, run-directory callbacks and evaluation. Never imports `deploy`."""
