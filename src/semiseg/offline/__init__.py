"""The offline pipeline above the training engine: pseudo-label sets for a whole unlabeled
list (`label_set`), self-training in rounds (`rounds`) and the RPPI object detector
(`detector_training`). Each calls the engine (or a trained checkpoint); the engine imports
none of them."""
