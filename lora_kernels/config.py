"""``LoRAConfig``: the hyper-parameters of one adapter, validated once, with the one scaling rule.

    scaling = alpha / rank          (alpha / √rank with rsLoRA);   alpha = None means alpha = rank

Every place that needs an adapter's settings takes them from here: :class:`lora_kernels.FusedLoRALinear`
(one config per named adapter of a layer), :func:`lora_kernels.replace_linear_with_fused_lora` and
:func:`lora_kernels.add_adapter` (with per-layer ``rank_pattern`` / ``alpha_pattern``), the metadata of our
adapter files, PEFT's ``adapter_config.json``, MiniMind's files and the MiniMind trainer.

Per-layer patterns follow PEFT: a key applies to a module path that matches the regular expression
``(.*\\.)?(key)$``, i.e. a path that is the key, ends in ``.<key>``, or matches the key as a regex (so
``{".*attn.*": 8, ".*mlp.*": 16}`` gives attention layers rank 8 and MLP layers rank 16); the first
matching key wins. Keys that could make regex matching hang are refused, naming the key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

INITS = ("minimind", "kaiming", "pissa", "olora")
# The initialisations that rewrite the base weight (it keeps the residual W − s·B·A, lora_kernels.init);
# "pissa_niter_<n>" is PiSSA by the randomized SVD with n subspace iterations (PEFT's fast variant).
RESIDUAL_INITS = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(?P<niter>[0-9]+)")
# The settings of one adapter that functions also take one by one (beside config=LoRAConfig(...)).
SETTINGS = ("rank", "alpha", "dropout", "use_rslora", "init", "use_dora")
# The parameter names of an adapter inside a layer (lora_magnitude only for DoRA adapters).
LORA_PARAM_NAMES = ("lora_A", "lora_B", "lora_magnitude")
DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def is_init_value(init: Any) -> bool:
    """True for an initialisation :class:`LoRAConfig` accepts: one of INITS, or ``"pissa_niter_<n>"``."""
    return isinstance(init, str) and (init in INITS or _PISSA_NITER.fullmatch(init) is not None)


def is_residual_init(init: Any) -> bool:
    """True for an initialisation that rewrites the base weight: ``"pissa"``, ``"pissa_niter_<n>"``, ``"olora"``."""
    return isinstance(init, str) and (init in RESIDUAL_INITS or _PISSA_NITER.fullmatch(init) is not None)


def pissa_niter(init: str) -> Optional[int]:
    """n of ``"pissa_niter_<n>"`` (the randomized SVD's subspace iterations); None for any other init."""
    match = _PISSA_NITER.fullmatch(init)
    return None if match is None else int(match["niter"])


def check_adapter_name(name: Any) -> str:
    """``name`` if it can name an adapter (letters, digits, ``_`` and ``-``: a module key and a folder name).

    Raises:
        ValueError: naming the value.
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name must be a non-empty string of letters, digits, '_' and '-' (not starting "
                         f"with '-'), got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------------
# Pattern keys (rank_pattern / alpha_pattern), with PEFT's matching rule and a guard against hostile regexes


try:  # the regex parser, to refuse patterns whose matching time can explode
    import re._parser as _regex_parser
except ImportError:  # Python < 3.11
    import sre_parse as _regex_parser

_REGEX_SPECIALS = set("\\^$*+?{}[]|()")
MAX_PATTERN_LENGTH = 1000
# Unbounded repeats in one key; PEFT's wrapper adds one, and the matching time of a failed match grows
# like len(path) ** (repeats + 1), which stays in the milliseconds for module paths with 3.
MAX_PATTERN_REPEATS = 2


@functools.lru_cache(maxsize=1024)
def check_pattern(key: str) -> Optional[str]:
    """Why ``key`` cannot be used as a rank/alpha pattern (None when it can).

    PEFT reads each key as a regular expression. A backtracking engine can take exponential time on
    nested repeats (``(.*.*)*X``), repeated alternatives (``(a|ab)*``) or backreferences, so those are
    refused, as are keys longer than MAX_PATTERN_LENGTH or with more than MAX_PATTERN_REPEATS repeats.
    """
    if not isinstance(key, str) or not key:
        return f"a pattern must be a non-empty string, got {key!r}"
    if len(key) > MAX_PATTERN_LENGTH:
        return f"the pattern is {len(key)} characters long, more than {MAX_PATTERN_LENGTH}"
    if not _REGEX_SPECIALS & set(key):
        return None
    try:
        parsed = _regex_parser.parse(key)
    except re.error as err:
        return f"{key!r} is not a valid regular expression ({err})"

    def repeats(items, inside_repeat: bool) -> int:
        count = 0
        for op, arg in items:
            name = str(op)
            if name.startswith("GROUPREF"):
                raise ValueError("backreferences are not allowed")
            if name.endswith("REPEAT") and arg[1] > 1:
                if inside_repeat:
                    raise ValueError("nested repeats (like (a*)* or (.*.*)*) are not allowed")
                count += 1 + repeats(arg[2], True)
                continue
            if name == "BRANCH" and inside_repeat:
                raise ValueError("alternatives inside a repeat (like (a|b)*) are not allowed")
            for child in arg if isinstance(arg, (tuple, list)) else ():
                for sub in child if isinstance(child, list) else [child]:
                    if isinstance(sub, _regex_parser.SubPattern):
                        count += repeats(sub, inside_repeat)
        return count

    try:
        count = repeats(parsed, False)
    except ValueError as err:
        return f"{key!r} could make matching take forever: {err}"
    if count > MAX_PATTERN_REPEATS:
        return f"{key!r} has {count} repeats (* + {{}}), more than {MAX_PATTERN_REPEATS}"
    return None


def pattern_value(pattern: Mapping[str, Any], module_path: str, default: Any) -> Any:
    """``pattern[key]`` for the first key whose regex ``(.*\\.)?(key)$`` matches ``module_path``, else default.

    Keys are checked by :func:`check_pattern` first, so a file cannot make this hang.
    """
    for key, value in pattern.items():
        why = check_pattern(key)
        if why is not None:
            raise ValueError(f"pattern {key!r}: {why}")
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


# ---------------------------------------------------------------------------------------------------
# The config


def is_finite_number(value: Any) -> bool:
    """True for a finite int or float (not a bool, not a numeric string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """The LoRA scale: ``alpha / rank``, or ``alpha / √rank`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclass(frozen=True)
class LoRAConfig:
    """The settings of one adapter.

    Args:
        rank: r >= 1.
        alpha: > 0; None means alpha = rank (scaling 1, MiniMind's unscaled LoRA).
        dropout: dropout probability on the LoRA path's input, in [0, 1).
        use_rslora: scale by alpha / √rank instead of alpha / rank.
        init: ``"minimind"`` (A ~ N(0, 0.02²)) or ``"kaiming"`` (Kaiming-uniform, a = √5, as PEFT), B = 0 in both;
            or one that rewrites the base weight (PEFT's ``init_lora_weights`` of the same name, see
            :mod:`lora_kernels.init`): ``"pissa"`` (A, B from the r principal singular vectors of W),
            ``"pissa_niter_<n>"`` (the same by the randomized SVD, n subspace iterations) or ``"olora"`` (from
            W's QR); the base then keeps the residual W − s·B·A, so the initial output is the base's.
        use_dora: DoRA (Liu et al. 2024, PEFT's ``use_dora=True``): the layer also gets a trainable magnitude
            m (out_features,), initialised to ‖W + s·B·A‖ per row (:mod:`lora_kernels.dora`).
        rank_pattern, alpha_pattern: per-layer ranks / alphas by module path (PEFT's rule, module
            docstring); :meth:`for_module` applies them.

    ``scaling`` (alpha / rank, or alpha / √rank) and ``lora_alpha`` (alpha with None resolved) are
    derived once, at construction.

    Raises:
        ValueError: any value out of range or of the wrong type, naming the field and the value.
    """

    rank: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "minimind"
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    lora_alpha: float = field(init=False, repr=False, compare=False)
    scaling: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = self.problems(self.rank, self.alpha, self.dropout, self.use_rslora, self.init, self.use_dora)
        problems += pattern_problems(self.rank_pattern, self.alpha_pattern)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        lora_alpha = float(self.rank if self.alpha is None else self.alpha)
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "lora_alpha", lora_alpha)
        object.__setattr__(self, "scaling", lora_scaling(self.rank, lora_alpha, self.use_rslora))

    @staticmethod
    def problems(rank: Any, alpha: Any, dropout: Any, use_rslora: Any = False, init: Any = "minimind",
                 use_dora: Any = False) -> List[str]:
        """Every problem with these values, each naming the field and the value (empty when all are fine)."""
        problems = []
        if not is_rank_value(rank) or not isinstance(rank, int):
            problems.append(f"rank must be an integer >= 1, got {rank!r}")
        if alpha is not None and not is_alpha_value(alpha):
            problems.append(f"alpha must be a finite number > 0 (or None for alpha = rank), got {alpha!r}")
        if not (is_finite_number(dropout) and 0.0 <= dropout < 1.0):
            problems.append(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            problems.append(f"use_rslora must be True or False, got {use_rslora!r}")
        if not is_init_value(init):
            problems.append(f"init must be one of {INITS} or 'pissa_niter_<n>' (n >= 0), got {init!r}")
        if not isinstance(use_dora, bool):
            problems.append(f"use_dora must be True or False, got {use_dora!r}")
        return problems

    @classmethod
    def resolve(cls, config: Optional["LoRAConfig"] = None, **settings: Any) -> "LoRAConfig":
        """``config``, or the config of the separate ``settings`` (any of ``rank``, ``alpha``, ``dropout``,
        ``use_rslora``, ``init``, ``use_dora``): what the functions that take either ``config=LoRAConfig(...)`` or the
        settings one by one call. A setting left None takes this class's default (alpha None: alpha = rank).

        Beside ``config``, a setting equal to its default is accepted (it says nothing new); any other value
        is refused, since it would be ignored.

        Raises:
            TypeError: ``config`` is not a LoRAConfig, both ``config`` and a setting are given, or a setting
                name is not one of the six.
            ValueError: a setting out of range or of the wrong type (see the class).
        """
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise TypeError(f"unknown LoRA setting(s) {unknown}; the settings are {list(SETTINGS)}")
        given = {name: value for name, value in settings.items() if value is not None}
        if config is None:
            return cls(**given)
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a lora_kernels.LoRAConfig, got {type(config).__name__}")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        if any(value != defaults[name] for name, value in given.items()):
            raise TypeError("give either config=LoRAConfig(...) or rank/alpha/dropout/use_rslora/init/use_dora, "
                            "not both")
        return config

    def replace(self, **changes: Any) -> "LoRAConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def for_module(self, module_path: str) -> "LoRAConfig":
        """The config of the layer at ``module_path``: ``rank_pattern`` / ``alpha_pattern`` applied, the
        patterns themselves dropped. A layer whose rank comes from the pattern and whose alpha is None keeps
        alpha = its own rank (scaling 1)."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        rank = int(pattern_value(self.rank_pattern, module_path, self.rank))
        alpha = pattern_value(self.alpha_pattern, module_path, self.alpha)
        return dataclasses.replace(self, rank=rank, alpha=None if alpha is None else float(alpha),
                                   rank_pattern={}, alpha_pattern={})

    def layer_settings(self) -> Dict[str, Any]:
        """The per-layer fields our adapter files record: ``{"rank", "alpha", "use_rslora", "dropout"}``, and
        ``"use_dora": true`` for a DoRA adapter."""
        settings = {"rank": self.rank, "alpha": self.lora_alpha, "use_rslora": self.use_rslora, "dropout": self.dropout}
        return {**settings, "use_dora": True} if self.use_dora else settings

    @classmethod
    def from_layer_settings(cls, settings: Mapping[str, Any], rank: int) -> "LoRAConfig":
        """The config a file's (already checked) layer settings describe for an adapter of ``rank``; fields
        the file leaves out: alpha = rank, no dropout, no rsLoRA."""
        alpha = settings.get("alpha")
        return cls(rank=int(rank), alpha=None if alpha is None else float(alpha),
                   dropout=float(settings.get("dropout", 0.0)), use_rslora=settings.get("use_rslora", False),
                   use_dora=settings.get("use_dora", False))


def is_rank_value(value: Any) -> bool:
    """True for a finite integral number >= 1 (``8`` or ``8.0``, as a JSON file may hold it)."""
    return is_finite_number(value) and float(value).is_integer() and value >= 1


def is_alpha_value(value: Any) -> bool:
    """True for a finite number > 0."""
    return is_finite_number(value) and value > 0


def pattern_problems(rank_pattern: Any, alpha_pattern: Any) -> List[str]:
    """Every problem with a ``rank_pattern`` / ``alpha_pattern`` pair (from code or from a PEFT config): not
    an object, a key that cannot be used (:func:`check_pattern`), a value that is no rank / alpha."""
    problems = []
    for name, pattern, test, wanted in (("rank_pattern", rank_pattern, is_rank_value, "an integer >= 1"),
                                        ("alpha_pattern", alpha_pattern, is_alpha_value, "a finite number > 0")):
        if not isinstance(pattern, Mapping):
            problems.append(f"{name} must be an object (pattern -> value), got {pattern!r:.80}")
            continue
        for key, value in pattern.items():
            why = check_pattern(key)
            if why is not None:
                problems.append(f"{name} key {key!r}: {why}")
            if not test(value):
                problems.append(f"{name}[{key!r}] must be {wanted}, got {value!r}")
    return problems
