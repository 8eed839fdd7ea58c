"""The torch-free core: the contract between training, export, runtime and serving.

- :mod:`~diffgap.core.iospec`: each exportable module's I/O declaration (tensor names, dtypes,
  batch profile), the one place tensor roles are named;
- :mod:`~diffgap.core.manifest`: the export directory's ``manifest.json``;
- :mod:`~diffgap.core.fsutil`: atomic writes, hashing, versioned JSON;
- :mod:`~diffgap.core.errors`: :class:`~diffgap.core.errors.UserError`;
- preprocessing shared by the PyTorch encoders and the runtime: :mod:`~diffgap.core.audio`,
  :mod:`~diffgap.core.video`, :mod:`~diffgap.core.tokenizer`.

Everything here imports numpy and small pure-Python packages only; ``diffgap.runtime`` and
``diffgap.triton_models`` import nothing else from the package. The import-linter contracts in
``pyproject.toml`` (run by ``make test``) enforce it.
"""
