"""SPP layers: the frozen pruned linear plus the multiplicative SPP factors of each adapter.

Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models", ICML 2024,
arXiv:2405.16057. The maths lives in :mod:`spp_peft.kernel`; this module owns the adapters' parameters,
their life cycle (add, activate, merge, unmerge, delete) and the zero-set checks around merging.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..kernel import AdapterFactors, delta_factor, effective_weight, group_index, scaling, spp_linear
from ..sparsity import (
    CHECK_MODES,
    MaskRecord,
    SparsityViolation,
    as_out_in,
    describe_mask,
    enforce_zero_set,
    in_out_features,
    is_fan_in_fan_out,
    is_linear_like,
    mask_fingerprint,
    zero_mask,
    zero_set_change,
)


class SPPLayer(BaseTunerLayer):
    """State shared by SPP layers: per adapter ``spp_A`` (r, in), ``spp_B`` (out,), scale and dropout."""

    adapter_layer_names = ("spp_A", "spp_B")
    other_param_names = ("r", "spp_alpha", "scaling", "spp_dropout", "sparsity_check")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.spp_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.spp_dropout = nn.ModuleDict({})
        self.spp_A = nn.ParameterDict({})
        self.spp_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        # The module's name (for error messages), each adapter's integrity policy (set from its config in
        # update_layer), the kernel's row-chunking and the record of the base weight's zero mask at injection.
        self.spp_module_name: str = kwargs.get("module_name", "<unnamed>")
        self.sparsity_check: dict[str, str] = {}
        self.chunk_rows: Optional[int] = kwargs.get("chunk_rows")
        self.mask_record: Optional[MaskRecord] = None
        # Set by SPPModel between checking every layer's merge and merging them (see _planned_merge).
        self._merge_prechecked = False

        base = self.get_base_layer()
        if not is_linear_like(base):
            raise ValueError(
                f"SPP supports nn.Linear and transformers' Conv1D; module '{self.spp_module_name}' is "
                f"{type(base).__name__}"
            )
        self.in_features, self.out_features = in_out_features(base)

    @property
    def fan_in_fan_out(self) -> bool:
        return is_fan_in_fan_out(self.get_base_layer())

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        spp_alpha: float,
        spp_dropout: float,
        init_weights: bool = True,
        inference_mode: bool = False,
        sparsity_check: str = "strict",
    ) -> None:
        """Add (or re-create) the adapter ``adapter_name`` on this layer."""
        if not 1 <= r <= self.out_features:
            raise ValueError(
                f"SPP r={r} is invalid for module '{self.spp_module_name}' with out_features={self.out_features}: "
                f"r is the number of row groups and must satisfy 1 <= r <= out_features."
            )
        if sparsity_check not in CHECK_MODES:
            raise ValueError(f"sparsity_check must be one of {CHECK_MODES}, got {sparsity_check!r}")
        self.r[adapter_name] = r
        self.sparsity_check[adapter_name] = sparsity_check
        self.spp_alpha[adapter_name] = spp_alpha
        self.scaling[adapter_name] = scaling(spp_alpha, r)
        self.spp_dropout[adapter_name] = nn.Dropout(p=spp_dropout) if spp_dropout > 0 else nn.Identity()
        self.spp_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.spp_B[adapter_name] = nn.Parameter(torch.empty(self.out_features))
        self.reset_spp_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_spp_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Reference init: ``spp_A`` Kaiming-uniform (a=sqrt(5)), ``spp_B`` zero, so ``W' = W`` at step 0.

        With ``init_weights=False``, ``spp_B`` is drawn from U(-0.5, 0.5) instead (tests need a non-identity
        adapter; with s = 2 and Kaiming ``spp_A`` the factor stays within 1 +- 1/sqrt(in_features))."""
        if adapter_name not in self.spp_A:
            return
        nn.init.kaiming_uniform_(self.spp_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.spp_B[adapter_name])
        else:
            nn.init.uniform_(self.spp_B[adapter_name], -0.5, 0.5)

    # ------------------------------------------------------------------------------------------- maths

    def factors(self, adapter_names: list[str]) -> list[AdapterFactors]:
        return [AdapterFactors(self.spp_A[a], self.spp_B[a], self.scaling[a]) for a in adapter_names]

    def group_index(self, adapter_name: str) -> torch.Tensor:
        """The row group of each output row for ``adapter_name`` (see :func:`spp_peft.kernel.group_index`)."""
        return group_index(self.out_features, self.r[adapter_name])

    # ----------------------------------------------- reading and writing the base (quantized bases override)

    def _dense_weight(self) -> torch.Tensor:
        """The base weight as a dense tensor in its stored layout (a quantized base dequantizes)."""
        return self.get_base_layer().weight

    def _store(self, dense: torch.Tensor):
        """What writing ``dense`` would put into the base (a quantized base requantizes); writes nothing."""
        return dense

    def _stored_dense(self, stored) -> torch.Tensor:
        """What the base would read back after storing ``stored``: the weight the zero-set check compares."""
        return stored

    def _write(self, stored) -> None:
        with torch.no_grad():
            self.get_base_layer().weight.copy_(stored)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W * D`` for one adapter, in the base layer's layout and dtype (``W' = W + delta``)."""
        weight = self._dense_weight()
        w = as_out_in(weight, self.fan_in_fan_out)
        with torch.no_grad():
            delta = effective_weight(w, self.factors([adapter_name]), include_base=False, dtype=torch.float32)
        return as_out_in(delta, self.fan_in_fan_out).to(weight.dtype)

    @torch.no_grad()
    def _reweighted(self, weight: torch.Tensor, merged: list[str], target: list[str]) -> tuple[torch.Tensor, int]:
        """The weight with the adapters ``target`` merged, given that ``merged`` are merged in ``weight`` now.

        Computed in fp32 and cast back once. Merged adapters add their factors, ``W * (1 + D_1 + D_2)``, as in
        the unmerged forward, so merging adapters one by one or together gives the same weight. Returns the new
        weight and the number of entries that could not be restored (factor exactly 0 when unmerging)."""
        w = as_out_in(weight.detach(), self.fan_in_fan_out).float()
        lost = 0
        if merged:
            denom = delta_factor(self.factors(merged), self.out_features, torch.float32).add_(1.0)
            unrecoverable = denom == 0
            lost = int(unrecoverable.sum().item())
            w = torch.where(unrecoverable, torch.zeros_like(w), w / denom)
        if target:
            w = effective_weight(w, self.factors(target), dtype=torch.float32)
        return as_out_in(w, self.fan_in_fan_out).to(weight.dtype), lost

    def _factor_is_finite(self, adapters: list[str]) -> bool:
        """True when ``D`` of ``adapters`` is provably finite, from the tiny factors alone:
        ``|D| <= sum_a |s_a| max|B_a| max|A_a|`` below fp32's largest value. Then ``0 * (1 + D)`` and
        ``0 / (1 + D)`` are exactly 0, so merging or unmerging cannot fill a zero (see ``zero_set_change``)."""
        bound = 0.0
        for a in adapters:
            A, B = self.spp_A[a].detach(), self.spp_B[a].detach()
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                return False
            bound += abs(self.scaling[a]) * float(B.abs().max()) * float(A.abs().max())
        return math.isfinite(bound) and bound < torch.finfo(torch.float32).max

    def _check_mode(self, adapters: list[str]) -> str:
        """The strictest integrity policy among ``adapters`` (each adapter keeps its own)."""
        return min((self.sparsity_check.get(a, "strict") for a in adapters), key=CHECK_MODES.index)

    def verify_base_mask(self) -> Optional[int]:
        """Raise unless the (unmerged) base weight still has the zero mask recorded at injection: whatever wrote
        into the base since then (a loader, user code), the adapter no longer matches it. Returns the number of
        zeros (counted on the mask just checked, so the zero-set check need not read the weight again), or
        None when there is nothing to verify."""
        if self.mask_record is None or self.merged:
            return None
        weight = as_out_in(self._dense_weight().detach(), self.fan_in_fan_out)
        zeros = zero_mask(weight)
        if mask_fingerprint(zeros) != self.mask_record.fingerprint:
            actual = describe_mask(weight)
            raise SparsityViolation(
                f"module '{self.spp_module_name}': the base weight's zero mask changed since the adapter was attached "
                f"(sparsity {self.mask_record.sparsity:.2%} -> {actual.sparsity:.2%}); refusing to merge, the model "
                "is unchanged"
            )
        return int(zeros.sum())

    def _checked(self, new_weight: torch.Tensor, action: str, safe: bool, adapters: list[str], emit: bool,
                 zeros_before: Optional[int] = None):
        """What to write for ``new_weight`` (see :meth:`_store`), after the finiteness (``safe``) and zero-set
        checks of what the base would then hold. ``adapters`` produced it. Nothing is written here."""
        stored = self._store(new_weight)
        new_weight = self._stored_dense(stored)
        if safe and not torch.isfinite(new_weight).all():
            raise ValueError(
                f"{action} of module '{self.spp_module_name}' produced non-finite weights; the model is unchanged. "
                f"The adapter seems broken (check spp_A / spp_B for NaN or inf)."
            )
        mode = self._check_mode(adapters)
        if mode != "off":
            before = self._dense_weight().detach()
            change = zero_set_change(before, new_weight, self._factor_is_finite(adapters) and stored is new_weight,
                                     zeros_before)
            self.last_zero_set_change = change
            message = enforce_zero_set(self.spp_module_name, change, mode, action)
            if message and emit:
                warnings.warn(message)
        return stored

    def _planned_merge(self, safe_merge: bool, adapter_names: Optional[list[str]], emit: bool):
        """``(adapters to merge, merged weight)`` after every check, or ``([], None)`` when nothing is to merge."""
        adapter_names = check_adapters_to_merge(self, adapter_names) if emit else (adapter_names or self.active_adapters)
        to_merge = [a for a in adapter_names if a in self.spp_A and a not in self.merged_adapters]
        if not to_merge:
            return [], None
        merged = [a for a in self.merged_adapters if a in self.spp_A]
        if self._merge_prechecked:
            # The model checked this very merge of every layer a moment ago (all-or-nothing): the result is
            # deterministic, so compute and store it without checking it twice.
            weight, _ = self._reweighted(self._dense_weight(), merged, merged + to_merge)
            return to_merge, self._store(weight)
        zeros_before = self.verify_base_mask()
        weight, _ = self._reweighted(self._dense_weight(), merged, merged + to_merge)
        return to_merge, self._checked(weight, "merge", safe_merge, merged + to_merge, emit, zeros_before)

    def _planned_unmerge(self, emit: bool) -> Optional[torch.Tensor]:
        merged = [a for a in self.merged_adapters if a in self.spp_A]
        if not merged:
            return None
        weight, lost = self._reweighted(self._dense_weight(), merged, [])
        if lost and emit:
            warnings.warn(
                f"unmerge of module '{self.spp_module_name}': {lost} weight(s) had a merged factor of exactly 0 "
                f"and cannot be restored; they stay 0."
            )
        return self._checked(weight, "unmerge", False, merged, emit)

    def check_merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
                    emit: bool = False) -> None:
        """Raise exactly as :meth:`merge` would, without writing anything (lets a model merge all-or-nothing);
        ``emit``: also give the warnings the merge would give."""
        self._planned_merge(safe_merge, adapter_names, emit=emit)

    def check_unmerge(self) -> None:
        """Raise exactly as :meth:`unmerge` would, without writing anything."""
        self._planned_unmerge(emit=False)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active adapters (or ``adapter_names``) into the base weight: ``W <- W * (1 + sum D)``.

        Every check (recorded mask, finiteness with ``safe_merge``, zero set) passes before the weight is written;
        on a refusal the layer is unchanged.

        Args:
            safe_merge: refuse if the merged weight is not finite.
            adapter_names: adapters to merge; default: the active ones.
        """
        to_merge, stored = self._planned_merge(safe_merge, adapter_names, emit=True)
        if stored is None:
            return
        self._write(stored)
        self.merged_adapters.extend(to_merge)

    def unmerge(self) -> None:
        """Undo every merge: ``W <- W_merged / (1 + sum D)`` (zeros are restored bit for bit)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        stored = self._planned_unmerge(emit=True)
        if stored is not None:
            self._write(stored)
        self.merged_adapters = []

    def record_mask(self) -> MaskRecord:
        """Describe the base weight's current zero mask (see :func:`spp_peft.sparsity.describe_mask`)."""
        self.mask_record = describe_mask(self._dense_weight(), self.fan_in_fan_out)
        return self.mask_record


class Linear(nn.Module, SPPLayer):
    """SPP on an ``nn.Linear`` or a GPT-2 ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 16,
        spp_alpha: float = 32.0,
        spp_dropout: float = 0.0,
        init_weights: bool = True,
        inference_mode: bool = False,
        sparsity_check: str = "strict",
        **kwargs,
    ) -> None:
        super().__init__()
        SPPLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, spp_alpha, spp_dropout, init_weights, inference_mode, sparsity_check)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self._base_compute_dtype(x)

    def _base_compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the base computes in outside autocast (a quantized base: its compute dtype)."""
        return self.get_base_layer().weight.dtype

    def _kernel_weight(self, dtype: torch.dtype):
        """The base weight as the kernel takes it: the parameter (a quantized base: a dequantizing function)."""
        return self.get_base_layer().weight

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return nn.functional.linear(x, as_out_in(base.weight, self.fan_in_fan_out).to(x.dtype),
                                    None if base.bias is None else base.bias.to(x.dtype))

    def _spp_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        dtype = self._compute_dtype(x)
        x = x.to(dtype)
        weight = self._kernel_weight(dtype)
        # The kernel casts explicitly; autocast would otherwise recast inside the custom Function.
        with torch.autocast(x.device.type, enabled=False):
            uses_dropout = self.training and any(isinstance(self.spp_dropout[a], nn.Dropout) for a in adapters)
            if not uses_dropout:
                return spp_linear(x, weight, base.bias, self.factors(adapters), self.fan_in_fan_out,
                                  chunk_rows=self.chunk_rows)
            # Dropout on the adapter branch only: y = x W^T + b + dropout(x) (W * D)^T, one branch per adapter.
            result = self._base_output(x)
            for a in adapters:
                result = result + spp_linear(self.spp_dropout[a](x), weight, None, self.factors([a]),
                                             self.fan_in_fan_out, include_base=False, chunk_rows=self.chunk_rows)
            return result

    def _check_forward_args(self, x, *args, **kwargs):
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample uses its own adapter (``"__base__"`` = the pruned base alone)."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.spp_A:
                continue
            index = [i for i, name in enumerate(adapter_names) if name == adapter]
            result[index] = self._spp_forward(x[index], [adapter]).to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif adapter_names is not None:
            result = self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            active = [a for a in self.active_adapters if a in self.spp_A]
            result = self._spp_forward(x, active) if active else self.base_layer(x, *args, **kwargs)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "spp." + super().__repr__()
