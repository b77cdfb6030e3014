"""Small models and functions the CLI tests load by spec (``tests.qdqapp.models:NAME``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-bn-relu, a residual block and a linear head: rules, folding, export in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


class ExportsSomethingElse(TinyCNN):
    """Runs differently while exported: ONNX Runtime must disagree with PyTorch."""

    def forward(self, x):
        out = super().forward(x)
        return out + 5.0 if torch.onnx.is_in_onnx_export() else out


def exports_something_else() -> nn.Module:
    return ExportsSomethingElse()


def broken_eval(model: nn.Module, loader) -> float:
    raise RuntimeError("this evaluation always fails")


class WithAuxHead(TinyCNN):
    """An auxiliary head used only in training, as googlenet/inception have: calibration
    (eval mode) never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(8, 4)

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            return out, self.aux(torch.flatten(x.mean((2, 3), keepdim=True), 1)[:, :8])
        return out


def with_aux_head() -> nn.Module:
    return WithAuxHead()


#: the words of the tiny text models' vocabulary (and of their sentence files)
WORDS = ("the a cat dog bird sat ran flew on under over mat tree roof is was red blue green "
         "big small fast slow and or very quite old new").split()
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def save_tiny_bert(folder, classifier: bool = False, tokenizer: bool = True, seed: int = 0):
    """A random two-layer BERT (hidden 32) and its word-level tokenizer saved in ``folder``,
    as a transformers folder a user would have: ``hf:FOLDER`` loads it. Weights of std
    0.1 and 20x gains on two channels of the LayerNorm before each FFN (the outlier
    channels of trained transformers) make INT8 cost some cosine (about 0.998 min)."""
    import transformers

    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64,
                                     num_labels=3, initializer_range=0.1)
    torch.manual_seed(seed)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    model = cls(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm) and name.endswith("attention.output.LayerNorm"):
                module.weight[:2] *= 20.0
    model.save_pretrained(folder)
    if tokenizer:
        transformers.BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def write_sentences(path, count: int, seed: int = 0) -> str:
    """``count`` different sentences of 3-9 words of :data:`WORDS`, one per line."""
    gen = torch.Generator().manual_seed(seed)
    lines = []
    while len(lines) < count:
        n = int(torch.randint(3, 10, (1,), generator=gen))
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=gen)]
        line = " ".join(words)
        if line not in lines:
            lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class OneClassCNN(TinyCNN):
    """TinyCNN whose head always picks class 0, as random weights often nearly do: top-1
    cannot see any layer's quantization."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([1e4, 0.0, 0.0, 0.0]))


def one_class_cnn() -> nn.Module:
    return OneClassCNN()
