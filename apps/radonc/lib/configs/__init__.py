"""One file per served model, each holding ``config = ModelConfig(...)``: add a file to add a model."""
