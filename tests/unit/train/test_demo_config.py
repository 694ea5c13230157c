import random
from pathlib import Path

import yaml

from growclip_stream.data.datasets import CLASS_CAPTION_TEMPLATES, FASHION_MNIST_CLASSES, class_caption

DEMO = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"


def test_every_demo_caption_fits_the_demo_context() -> None:
    # A caption cut at the context length can lose its class name ("a black and white picture of
    # a" at 32 tokens): the model then learns from captions that say nothing about the image.
    context = yaml.safe_load(DEMO.read_text())["model"]["context_length"]
    for name in FASHION_MNIST_CLASSES:
        captions = {class_caption(name, random.Random(seed)) for seed in range(300)}
        assert len(captions) == len(CLASS_CAPTION_TEMPLATES)  # every template drawn
        for caption in captions:
            assert len(caption.encode()) + 2 <= context, caption  # + BOS, EOS
