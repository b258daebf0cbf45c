"""Written by bindings/extension.cmake at build time: the torch moequant._C was compiled against."""
TORCH_VERSION = "2.15.0+cu132"
