"""Lightning callbacks that schedule calmwild's evaluations during training and log their results."""
