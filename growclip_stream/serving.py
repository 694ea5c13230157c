"""The immutable model snapshot that serving reads, and the store it is published to.

The trainer owns the training model and changes it in place every step, and replaces it on
growth. Serving never touches it: the trainer *captures* a snapshot (a private deep copy, in eval
mode, without gradients) and *publishes* it to a :class:`SnapshotStore`, which swaps one reference.
A request reads ``store.current`` once and uses that snapshot for all its work, so it sees one
consistent model even when a growth is published while it runs, and never races the trainer's
in-place updates.

Forward passes run under ``torch.inference_mode()``. Several request threads may run the same
snapshot at once: the forward pass of a module in eval mode reads its parameters and writes no
state, so that is safe.

The store keeps the newest snapshot of each of the last ``keep_versions`` generations, so a client
that stored embeddings of an older generation can pin it (``growclip@N``) while it re-embeds.
Requests are batched across clients by the service (``growclip_daemon.batching``); the snapshot
offers the two halves a batcher needs: per-request preparation (:meth:`ModelSnapshot.tokenize`,
:meth:`ModelSnapshot.decode_images`) and one forward pass over the concatenation
(:meth:`ModelSnapshot.embed_tokens`, :meth:`ModelSnapshot.embed_pixels`).

On a GPU the snapshot lives on the training device (optionally in bf16), beside the training
model. The copy is made on a side CUDA stream that first waits for the training stream's queued
work, and the training stream then waits (on the device, the host never blocks) for the copy to
finish before it changes the weights again; requests run on their own serving stream, which waits
for the same event before the snapshot's first use.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from growclip_stream.data.images import ImageTransform, normalize_batch
from growclip_stream.data.records import RecordError, RecordLimits, sniff_content_type
from growclip_stream.model.clip import ArchConfig, GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer, trim_padding

MAX_LOGIT_SCALE = 100.0
"""Upper bound of the softmax temperature ``exp(logit_scale)``, as in CLIP."""


_HEADER_READERS: dict[str, type[ImageFile.ImageFile]] = {
    "image/png": PngImagePlugin.PngImageFile,
    "image/jpeg": JpegImagePlugin.JpegImageFile,
    "image/webp": WebPImagePlugin.WebPImageFile,
}


class TokenIds(tuple[int, ...]):
    """A text given as ids of the byte tokenizer (0..255, the UTF-8 bytes), not as a string."""


_PNG_IHDR_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # signature, IHDR's length (13) and type


def claimed_pixels(data: bytes) -> int:
    """Width x height that an encoded image's header claims, read without decoding any pixel (a
    request's pixel budget is checked before its images are decoded). 0 when the header cannot be
    read: the decoder then rejects the image with its precise reason.

    A PNG's size is read from its first chunk (IHDR, which the format requires first) directly:
    Pillow's header parse walks every chunk before the pixels and cost 8% of the event loop."""
    if data[:16] == _PNG_IHDR_START and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width) * int(height)
    try:
        width, height = _HEADER_READERS[sniff_content_type(data)](io.BytesIO(data)).size
    except Exception:  # RecordError (not an image); Pillow's SyntaxError, OSError, struct.error, ...
        return 0
    return max(0, int(width)) * max(0, int(height))


class ImageItemError(RecordError):
    """A bad image in a batch: a :class:`RecordError` that also names the image's position."""

    def __init__(self, index: int, cause: RecordError) -> None:
        super().__init__(cause.reason, f"image {index}: {cause.detail}")
        self.index = index  # position in the batch of images passed to embed_images
        self.cause = cause


@dataclass(frozen=True)
class ModelSnapshot:
    """What serving reads. Never mutated after publish; publishing swaps the reference (a request
    never sees a half-grown model)."""

    model: GrowCLIP  # a private deep copy in eval mode, requires_grad False
    # f"{generation}.{step}.{run}", e.g. "2.480.3f9a1c" = grown twice, trainer step 480, in run
    # 3f9a1c (a random id drawn at every start: a restart from a checkpoint repeats steps, and the
    # run keeps one version string from naming two models); "2.480" when no run is given
    version: str
    generation: int  # number of growths behind this architecture
    step: int  # trainer step the weights were captured at
    samples_trained: int
    growth_history: tuple[dict[str, Any], ...]  # private copies of the trainer's records
    published_at: float  # time.time() at capture
    ready: torch.cuda.Event | None = None  # recorded after a CUDA copy; inference waits for it
    _tokenizer: ByteTokenizer = field(init=False, repr=False, compare=False)
    _transform: ImageTransform = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        arch = self.model.arch
        object.__setattr__(self, "_tokenizer", ByteTokenizer(arch.context_length))
        object.__setattr__(self, "_transform", ImageTransform(arch.image_size, arch.channels))

    @classmethod
    def capture(
        cls,
        model: GrowCLIP,
        *,
        generation: int,
        step: int,
        samples_trained: int,
        growth_history: Sequence[Mapping[str, Any]],
        run: str = "",
        dtype: torch.dtype | None = None,
    ) -> ModelSnapshot:
        """Copy ``model`` into a new snapshot. Call it from the thread that trains ``model``
        (between steps), so that the copy sees one consistent set of weights. ``dtype`` (e.g.
        bf16 for serving on a GPU) casts the copy; None keeps the model's."""
        copied, ready = _copy_model(model, dtype)
        copied.eval()
        copied.requires_grad_(False)
        for p in copied.parameters():
            p.grad = None  # the copy never trains; do not keep a second set of gradients alive
        return cls(
            model=copied,
            version=f"{generation}.{step}.{run}" if run else f"{generation}.{step}",
            generation=generation,
            step=step,
            samples_trained=samples_trained,
            growth_history=tuple(copy.deepcopy(dict(event)) for event in growth_history),
            published_at=time.time(),
            ready=ready,
        )

    @property
    def device(self) -> torch.device:
        return self.model.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.proj.weight.dtype

    def _infer(self) -> contextlib.AbstractContextManager[Any]:
        """Inference mode, on the serving stream of the snapshot's CUDA device (after its copy)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.device.type == "cuda":
            stream = _side_stream(self.device, "serve")
            stack.enter_context(torch.cuda.stream(stream))
            if self.ready is not None:
                stream.wait_event(self.ready)
        return stack

    @property
    def arch(self) -> ArchConfig:
        return self.model.arch

    @property
    def num_params(self) -> int:
        return _count(self.model)

    @property
    def logit_scale(self) -> float:
        """The softmax temperature ``exp(logit_scale)``, clamped to :data:`MAX_LOGIT_SCALE`."""
        return min(float(self.model.logit_scale.detach().exp()), MAX_LOGIT_SCALE)

    @property
    def image_tokens(self) -> int:
        """Tokens the image tower reads per image (patches and the class token)."""
        return self.arch.image_tokens

    def parameters_by_tower(self) -> dict[str, int]:
        """Parameter counts: ``image`` and ``text`` (each tower, up to its projection into the
        shared width), ``shared`` (the shared encoder and the head both modalities use: final
        LayerNorm, projection, logit scale) and ``total`` (their sum)."""
        image = _count(self.model.image)
        text = _count(self.model.text)
        total = _count(self.model)
        return {"image": image, "text": text, "shared": total - image - text, "total": total}

    def _token_bytes(self, texts: Sequence[str | TokenIds]) -> list[bytes]:
        """Each text's bytes as the model reads them: a string's UTF-8 cut at a character boundary,
        :class:`TokenIds` as given (cut to the context plainly)."""
        cut = self.arch.context_length - 2
        return [self._tokenizer.truncate(t) if isinstance(t, str) else bytes(t[:cut]) for t in texts]

    def text_token_counts(self, texts: Sequence[str | TokenIds]) -> list[int]:
        """Tokens each text feeds the model (BOS and EOS included, after truncation)."""
        return [len(row) + 2 for row in self._token_bytes(texts)]

    def tokenize(self, texts: Sequence[str | TokenIds]) -> torch.Tensor:
        """(N, context_length) ids: strings through the byte tokenizer, :class:`TokenIds` as given,
        each framed by BOS and EOS."""
        return self._tokenizer.frame(self._token_bytes(texts))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) float32 L2-normalised text embeddings of (N, T) token ids. The padding
        after the longest text is not run (:func:`trim_padding`: exact, and half the work for short
        captions)."""
        tokens = trim_padding(tokens)
        with self._infer():
            return self.model.encode_text(tokens.to(self.device, non_blocking=True)).float().cpu()

    def embed_pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) float32 L2-normalised image embeddings of a (N, C, H, W) pixel batch."""
        with self._infer():
            batch = batch.to(self.device, self.dtype, non_blocking=True)
            return self.model.encode_image(batch).float().cpu()

    def embed_texts(self, texts: Sequence[str | TokenIds]) -> torch.Tensor:
        """(N, embed_dim) float32 L2-normalised text embeddings."""
        return self.embed_tokens(self.tokenize(texts))

    def decode_images(self, images: Sequence[bytes], limits: RecordLimits) -> torch.Tensor:
        """Decode and transform encoded images to a (N, C, H, W) float batch for this architecture.

        Raises :class:`ImageItemError` (a :class:`RecordError`) naming the first bad image.
        """
        pixels = []
        for i, data in enumerate(images):
            try:
                pixels.append(self._transform.pixels(data, limits))
            except ImageItemError:
                raise
            except RecordError as e:
                raise ImageItemError(i, e) from e
        c, s = self.arch.channels, self.arch.image_size
        return normalize_batch(pixels) if pixels else torch.empty((0, c, s, s))

    def embed_images(self, images: Sequence[bytes], limits: RecordLimits) -> torch.Tensor:
        """(N, embed_dim) float32 L2-normalised image embeddings of encoded PNG/JPEG/WebP bytes.

        Raises :class:`ImageItemError` (a :class:`RecordError`) naming the index of a bad image.
        """
        return self.embed_pixels(self.decode_images(images, limits))  # (N, C, H, W) -> (N, D)

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description: version, architecture, parameters, FLOPs, growth history."""
        arch = self.arch
        return {
            "version": self.version,
            "generation": self.generation,
            "step": self.step,
            "samples_trained": self.samples_trained,
            "architecture": json_safe(arch.to_dict()),
            "parameters": self.parameters_by_tower(),
            "flops_per_sample": int(arch.flops_per_sample()),
            "logit_scale": self.logit_scale,
            "growth_history": json_safe(list(self.growth_history)),
            "published_at": self.published_at,
        }


class SnapshotStore:
    """Holds the snapshots serving answers from. ``publish`` swaps the reference under a lock;
    readers take ``current`` once per request, without locking (a reference read is atomic).

    Besides the current snapshot it holds the newest snapshot of each of the ``keep_versions - 1``
    generations before it, for clients that pin an older generation while they re-embed."""

    def __init__(self, keep_versions: int = 1) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.keep_versions = keep_versions
        self._lock = threading.Lock()
        self._current: ModelSnapshot | None = None
        self._held: tuple[ModelSnapshot, ...] = ()  # newest per generation, oldest first; current last
        self._published = threading.Condition(self._lock)

    def publish(self, snap: ModelSnapshot) -> None:
        with self._lock:
            older = tuple(s for s in self._held if s.generation < snap.generation)
            self._held = (*older, snap)[-self.keep_versions :]
            self._current = snap
            self._published.notify_all()

    @property
    def current(self) -> ModelSnapshot | None:
        return self._current

    def held(self) -> tuple[ModelSnapshot, ...]:
        """The snapshots a client may ask for, oldest generation first; the current one last."""
        return self._held

    def get(self, version: str) -> ModelSnapshot | None:
        """The held snapshot of ``version``: a generation (``"2"``: its newest snapshot) or an
        exact ``"<generation>.<step>"``; None if it is not held (any more)."""
        for snap in reversed(self._held):
            if version in (str(snap.generation), snap.version):
                return snap
        return None

    def wait(self, timeout: float | None = None) -> ModelSnapshot | None:
        """The current snapshot, waiting up to ``timeout`` seconds for a first publish."""
        with self._lock:
            self._published.wait_for(lambda: self._current is not None, timeout)
            return self._current


_SIDE_STREAMS: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
_SIDE_STREAMS_LOCK = threading.Lock()


def _side_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """One long-lived CUDA stream per device and role ("copy" for snapshots, "serve" for requests)."""
    key = (device, role)
    with _SIDE_STREAMS_LOCK:
        if key not in _SIDE_STREAMS:
            _SIDE_STREAMS[key] = torch.cuda.Stream(device)
        return _SIDE_STREAMS[key]


def _copy_model(model: GrowCLIP, dtype: torch.dtype | None) -> tuple[GrowCLIP, torch.cuda.Event | None]:
    """A private copy of ``model`` (cast to ``dtype``); on CUDA made on a side stream, with its event."""
    device = model.proj.weight.device
    with torch.no_grad():
        if device.type != "cuda":
            copied = copy.deepcopy(model)
            return (copied if dtype is None else copied.to(dtype)), None
        train_stream = torch.cuda.current_stream(device)
        side = _side_stream(device, "copy")
        side.wait_stream(train_stream)  # the copy reads the weights after the queued step
        with torch.cuda.stream(side):
            copied = copy.deepcopy(model)
            if dtype is not None:
                copied = copied.to(dtype)
            ready = side.record_event()
        # the training stream must not update the weights under the copy; the host does not wait
        train_stream.wait_event(ready)
        for t in model.parameters():
            t.record_stream(side)  # the allocator must not recycle a source read on the side stream
        return copied, ready


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def json_safe(value: Any) -> Any:
    """``value`` with containers turned into dicts and lists, non-finite floats into None, and
    anything else that JSON cannot hold (tensors, paths, enums) into its ``str``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return json_safe(value.item())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    return str(value)
