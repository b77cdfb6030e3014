"""A small YOLO-style detector written for the tests (no downloads): Conv-BN-SiLU blocks,
C2f blocks (split, bottlenecks with residual adds, concat), an SPPF max-pool chain, an
FPN/PAN neck with nearest upsampling and concats, and three detection heads returned as
a tuple."""

from __future__ import annotations

import torch
from torch import nn


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBN(c, c)
        self.cv2 = ConvBN(c, c)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBN(cin, 2 * self.c, 1)
        self.cv2 = ConvBN((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            y.append(block(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        hidden = cin // 2
        self.cv1 = ConvBN(cin, hidden, 1)
        self.cv2 = ConvBN(hidden * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class TinyYolo(nn.Module):
    def __init__(self, classes: int = 3, w: int = 8):
        super().__init__()
        self.stem = ConvBN(3, w, 3, 2)
        self.down1 = ConvBN(w, 2 * w, 3, 2)
        self.c2f1 = C2f(2 * w, 2 * w)
        self.down2 = ConvBN(2 * w, 4 * w, 3, 2)
        self.c2f2 = C2f(4 * w, 4 * w)                    # P3
        self.down3 = ConvBN(4 * w, 8 * w, 3, 2)
        self.c2f3 = C2f(8 * w, 8 * w)                    # P4
        self.down4 = ConvBN(8 * w, 8 * w, 3, 2)
        self.sppf = SPPF(8 * w, 8 * w)                   # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top1 = C2f(16 * w, 8 * w, shortcut=False)
        self.top2 = C2f(12 * w, 4 * w, shortcut=False)   # out P3
        self.pan1 = ConvBN(4 * w, 4 * w, 3, 2)
        self.bot1 = C2f(12 * w, 8 * w, shortcut=False)   # out P4
        self.pan2 = ConvBN(8 * w, 8 * w, 3, 2)
        self.bot2 = C2f(16 * w, 8 * w, shortcut=False)   # out P5
        out = classes + 4
        self.heads = nn.ModuleList([nn.Conv2d(4 * w, out, 1), nn.Conv2d(8 * w, out, 1),
                                    nn.Conv2d(8 * w, out, 1)])

    def forward(self, x):
        p3 = self.c2f2(self.down2(self.c2f1(self.down1(self.stem(x)))))
        p4 = self.c2f3(self.down3(p3))
        p5 = self.sppf(self.down4(p4))
        t4 = self.top1(torch.cat([self.up(p5), p4], 1))
        o3 = self.top2(torch.cat([self.up(t4), p3], 1))
        o4 = self.bot1(torch.cat([self.pan1(o3), t4], 1))
        o5 = self.bot2(torch.cat([self.pan2(o4), p5], 1))
        return tuple(head(f) for head, f in zip(self.heads, (o3, o4, o5), strict=True))
