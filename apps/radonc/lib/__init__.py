"""The app's own code (MONAI Label puts the app folder on ``sys.path``): ``configs``, one file per model."""
