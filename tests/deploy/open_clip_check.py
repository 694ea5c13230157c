"""Loads an open_clip export with OpenCLIP's own ``create_model("local-dir:DIR")`` and embeds inputs.

Run as a separate process by test_export.py: ``python open_clip_check.py EXPORT_DIR INPUTS OUTPUTS``
(INPUTS: safetensors with ``pixels`` (N, 3, S, S) and ``tokens`` (M, L); OUTPUTS gets ``image`` and
``text``, L2-normalised by OpenCLIP).

OpenCLIP's package imports torchvision at import time, for its image transforms and for the
FrozenBatchNorm2d of its ResNet towers; PyPI's torchvision is a CUDA build that does not load beside
this CPU torch ("operator torchvision::nms does not exist"). Neither is used on the path tested here
(create_model building a ViT CLIP and loading its weights), so in this process torchvision is stood in
for by empty placeholder modules: any name imported from it is an inert class. Everything that builds
the model, reads the config and loads the state dict is OpenCLIP's own code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class _Placeholder(type):
    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def main(export_dir: str, inputs: str, outputs: str) -> None:
    sys.meta_path.insert(0, _TorchvisionStandIn())
    import open_clip

    torch.set_num_threads(1)
    model = open_clip.create_model(f"local-dir:{export_dir}", device="cpu", precision="fp32")
    model.eval()
    data = load_file(inputs)
    with torch.no_grad():
        image = model.encode_image(data["pixels"], normalize=True)
        text = model.encode_text(data["tokens"], normalize=True)
    save_file(
        {"image": image.contiguous(), "text": text.contiguous(), "logit_scale": model.logit_scale.detach()},
        outputs,
        metadata={"open_clip_version": open_clip.__version__, "class": type(model).__name__},
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
