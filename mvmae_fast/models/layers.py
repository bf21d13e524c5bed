"""ViT building blocks with timm's module and parameter names (so state dicts line up)."""

import torch
from torch import nn

from .. import backends, ops
from ..ops.mlp import fused_attention_half


class PatchEmbed(nn.Module):
    """Conv2d(in_chans, D, k=p, s=p) over a square image: (B, C, H, W) -> (B, L, D)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.attend(self.qkv(x))

    def attend(self, qkv):
        """The layer after its qkv projection: proj(attention(qkv))."""
        return self.proj(ops.attention(qkv, self.num_heads))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def fusable(self):
        """Whether ops.mlp computes this layer: fc1 and fc2 plain nn.Linear modules with biases (not
        replaced ones: their own forward must run) around the exact GELU."""
        return (type(self.act) is nn.GELU and self.act.approximate == "none" and _plain_linear(self.fc1)
                and _plain_linear(self.fc2))

    def forward(self, x):
        if self.fusable() and _fused_layers_allowed():
            return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    # Each half runs as fused ops when its modules are the stock ones (LayerNorm fused into the next
    # linear, the MLP with its residual: fused on the CPU in float32, elsewhere the plain modules'
    # computation); otherwise the modules themselves run.
    def forward(self, x):
        fused = self._fused_attention_half(x)
        if fused is not None:
            x = fused
        elif type(self.attn) is Attention:
            x = x + self.attn.attend(self._qkv(x))
        else:
            x = x + self.attn(self.norm1(x))
        return self._second_half(x)

    def forward_rows(self, x, rows, *, check_indices=True):
        """``forward(x)`` at rows ``rows`` (B, M) of each sample only, (B, N, D) -> (B, M, D): attention
        still reads every row's keys and values, but its projection, the residual and the MLP run on
        the M rows (MAE's last decoder block, whose other outputs the loss never reads)."""
        gather = lambda t: ops.gather_rows(t, rows, check_indices=check_indices)  # noqa: E731
        if type(self.attn) is not Attention:
            return gather(self(x))
        attended = ops.attention(self._qkv(x), self.attn.num_heads)
        return self._second_half(gather(x) + self.attn.proj(gather(attended)))

    def _fused_attention_half(self, x):
        """The first half as one autograd node (ops.mlp.fused_attention_half) when the modules are the
        stock ones with biases and the extension runs every piece here; else None."""
        norm, attn = self.norm1, self.attn
        if not (type(attn) is Attention and _plain_layer_norm(norm) and _plain_linear(attn.qkv)
                and _plain_linear(attn.proj) and x.dim() == 3):
            return None
        return fused_attention_half(x, norm.weight, norm.bias, norm.eps, attn.qkv.weight, attn.qkv.bias,
                                    attn.proj.weight, attn.proj.bias, attn.num_heads)

    def _qkv(self, x):
        return prenorm_linear(self.norm1, self.attn.qkv, x)

    def _second_half(self, x):
        norm, mlp = self.norm2, self.mlp
        if _plain_layer_norm(norm) and type(mlp) is Mlp and mlp.fusable() and _fused_layers_allowed():
            return ops.prenorm_mlp(x, norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias,
                                   mlp.fc2.weight, mlp.fc2.bias)
        return x + mlp(norm(x))


def prenorm_linear(norm, linear, x):
    """``linear(norm(x))``: one fused op (ops.prenorm_linear) when both are the stock modules with
    biases and the fused layers may run, else the modules themselves (a replaced module's own forward
    runs)."""
    if _plain_layer_norm(norm) and _plain_linear(linear) and _fused_layers_allowed():
        return ops.prenorm_linear(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)
    return linear(norm(x))


def _fused_layers_allowed():
    """The fused layer ops have torch and cpp backends only: under a forced triton backend (for the
    ops that have one) the model runs its plain modules instead, which compute the same."""
    return backends.requested_backend()[0] in (None, "torch", "cpp")


def _plain_linear(linear):
    """An nn.Linear itself (not a subclass or wrapper, whose forward may differ) with a bias and no
    forward hooks of its own (they would not fire inside a fused op): what the fused ops compute from
    its weight and bias."""
    return (type(linear) is nn.Linear and linear.bias is not None and not linear._forward_hooks
            and not linear._forward_pre_hooks)


def _plain_layer_norm(norm):
    """An nn.LayerNorm over the last dim with weight and bias: what the fused ops compute."""
    return (type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None
            and len(norm.normalized_shape) == 1)


class Projector(nn.Module):
    """MV-MAE's projector g: Linear -> (BatchNorm, ReLU, Linear) x (layers - 1)."""

    def __init__(self, dim, hidden=2048, out=128, layers=3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"projector layers must be >= 1, got {layers}")
        mods = []
        width = dim
        for _ in range(layers - 1):
            mods += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        mods.append(nn.Linear(width, out))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


def init_weights(module):
    """MAE's init: xavier-uniform Linear weights with zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def xavier_patch_embed_(patch_embed):
    """Xavier-uniform on the conv weight viewed as the (D, C*p*p) Linear it is; bias left as is."""
    w = patch_embed.proj.weight
    with torch.no_grad():
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
