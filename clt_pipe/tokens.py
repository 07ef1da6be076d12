"""The two token vocabularies, parsed once.

* ``TokenPolicy`` — which ViT positions a harvest stores per image: ``cls``, ``patches``, ``all`` or ``cls+K``
  (CLS plus K random patches). Its ``str`` is the string stored in the store's root attributes.
* ``TokenType`` — which stored rows a reader wants (fit's row filter, analysis' per-type numbers): ``cls``,
  ``patches`` or ``all``, decided by each row's position (0 = CLS).
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np

from clt_pipe.errors import ConfigError

TokenType = Literal["cls", "patches", "all"]
TOKEN_TYPES: tuple[TokenType, ...] = typing.get_args(TokenType)

_POLICY_RE = re.compile(r"^(cls|patches|all|cls\+(\d+))$")


def token_type(value: str, key: str = "tokens") -> TokenType:
    """``value`` as a ``TokenType``, or a ``ConfigError`` naming ``key``."""
    if value not in TOKEN_TYPES:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(TOKEN_TYPES)}")
    return typing.cast(TokenType, value)


def token_positions(tokens: TokenType, n_positions: int) -> np.ndarray:
    """The ViT positions (0 = CLS) of a token type in a sequence of ``n_positions`` (int64)."""
    if tokens == "cls":
        return np.zeros(1, np.int64)
    if tokens == "patches":
        return np.arange(1, n_positions, dtype=np.int64)
    if tokens == "all":
        return np.arange(n_positions, dtype=np.int64)
    raise ConfigError(f"tokens: {tokens!r} is not one of {', '.join(TOKEN_TYPES)}")


def token_mask(positions: np.ndarray, tokens: TokenType) -> np.ndarray:
    """Rows (by their ViT position; -1 = no token) that belong to a token type."""
    if tokens == "cls":
        return positions == 0
    if tokens == "patches":
        return positions > 0
    if tokens == "all":
        return positions >= 0
    raise ConfigError(f"tokens: {tokens!r} is not one of {', '.join(TOKEN_TYPES)}")


@dataclass(frozen=True)
class TokenPolicy:
    """A harvest's token selection: ``kind`` is cls | patches | all | cls+k; ``k`` patches for cls+k, else 0."""

    kind: Literal["cls", "patches", "all", "cls+k"]
    k: int = 0

    @classmethod
    def parse(cls, policy: str) -> "TokenPolicy":
        m = _POLICY_RE.match(policy)
        if not m:
            raise ConfigError(f"tokens: {policy!r} is not one of cls, patches, all, cls+K (e.g. cls+16)")
        if m.group(2) is not None:
            k = int(m.group(2))
            if k <= 0:
                raise ConfigError(f"tokens: cls+K needs K >= 1, got {policy!r}")
            return cls("cls+k", k)
        return cls(typing.cast(TokenType, policy))

    def __str__(self) -> str:
        return f"cls+{self.k}" if self.kind == "cls+k" else self.kind

    @property
    def all_tokens(self) -> bool:
        """Every position of every image, in order (the capture copies whole sequences)."""
        return self.kind == "all"

    def positions(self, n_positions: int, image_index: int, seed: int) -> np.ndarray:
        """Which of the ViT's positions (0 = CLS) an image's stored slots hold (int16, the stored token_index).

        ``cls+k`` draws its patches from a generator keyed by (seed, image index), so any shard can be
        recomputed alone and a resumed harvest picks the same patches.
        """
        if self.kind != "cls+k":
            return token_positions(self.kind, n_positions).astype(np.int16)
        rng = np.random.default_rng([seed, image_index])
        patches = np.sort(rng.choice(np.arange(1, n_positions), size=min(self.k, n_positions - 1), replace=False))
        return np.concatenate([[0], patches]).astype(np.int16)

    def tokens_per_image(self, n_positions: int) -> int:
        return len(self.positions(n_positions, 0, 0))
