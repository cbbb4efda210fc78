"""Platform profile: the one description of the virtual TDX machine.

The daemon builds it from the VM's configuration (vCPUs, RAM) and hands it to both the
TDX module model (CMRs, logical processors, keyids, feature bits) and, through
``vtdx.runtime.platform_rows``, to the QEMU plugin (CPUID bits and MSR values the guest
kernel checks).
Tests build variants (fewer keyids, no MOVDIR64B, Dynamic PAMT on) from the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vtdx.abi import fields as f
from vtdx.errors import VtdxError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: QEMU q35 keeps at most this much RAM below 4 GiB once RAM reaches 0xb0000000.
Q35_LOWMEM_SPLIT = 0xB000_0000
Q35_LOWMEM_MAX = 0x8000_0000
FOUR_GIB = 4 * GiB


@dataclass(frozen=True, slots=True)
class Region:
    """A physical address range [base, base + size)."""

    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, pa: int, size: int = 1) -> bool:
        return self.base <= pa and pa + size <= self.end


def q35_ram_layout(mem_bytes: int) -> tuple[Region, ...]:
    """Guest-physical RAM regions QEMU's q35 machine creates for ``mem_bytes`` of RAM.

    Same rule as QEMU's pc_q35: everything below 4 GiB when RAM is under 0xb0000000,
    otherwise 2 GiB below and the rest from 4 GiB up (the PCI hole in between).
    """
    low = mem_bytes if mem_bytes < Q35_LOWMEM_SPLIT else Q35_LOWMEM_MAX
    regions = [Region(0, low)]
    if mem_bytes > low:
        regions.append(Region(FOUR_GIB, mem_bytes - low))
    return tuple(regions)


@dataclass(frozen=True, slots=True)
class Profile:
    """Everything that differs between two virtual TDX platforms."""

    name: str = "default"
    num_lps: int = 2
    num_packages: int = 1
    ram: tuple[Region, ...] = field(default_factory=lambda: q35_ram_layout(2 * GiB))
    #: Convertible memory ranges; default: all RAM (see ``from_vm``).
    cmrs: tuple[Region, ...] = field(default_factory=lambda: q35_ram_layout(2 * GiB))
    #: IA32_MKTME_KEYID_PARTITIONING: MKTME keyids [1, mktme_keyids], TDX keyids after them.
    mktme_keyids: int = 15
    tdx_keyids: int = 16
    #: Physical address bits CPUID reports; the top ``keyid_bits`` carry the keyid.
    phys_bits: int = 46
    keyid_bits: int = 5
    #: CPU features the facade advertises (the kernel refuses TDX without them).
    movdir64b: bool = True
    #: Which public tdx-module tree the model follows where the trees differ: ``"1.5"``
    #: (intel/tdx-module 1.5.x) or ``"dpamt"`` (the public tree with Dynamic PAMT).
    generation: str = "1.5"
    #: TDX module features (TDX_FEATURES0 bits are derived from these, see ``features0``;
    #: users switch them by the names in ``FEATURES``).
    dynamic_pamt: bool = False
    demote_nointerrupt: bool = False
    no_rbp_mod: bool = True
    topology_enum: bool = True
    sys_disable: bool = True
    td_preserving: bool = False
    #: Module identity and limits reported through TDH.SYS.RD.
    module_version: tuple[int, int, int] = (1, 5, 16)
    build_num: int = 0
    build_date: int = 20260101
    max_tdmrs: int = 64
    max_reserved_per_tdmr: int = 16
    #: Bytes per PAMT entry at 4K/2M/1G (the module's pamt_entry_t is 16 bytes).
    pamt_entry_sizes: tuple[int, int, int] = (16, 16, 16)
    pamt_bitmap_entry_bits: int = 4
    max_vcpus_per_td: int = 576
    #: Sizes of TD control structures (bytes); KVM derives its TDCX/TDVPX page counts from them.
    tdr_base_size: int = 4096
    tdcs_base_size: int = 4 * 4096
    tdvps_base_size: int = 6 * 4096
    attributes_fixed0: int = 0x0000_0000_5000_0001
    attributes_fixed1: int = 0
    xfam_fixed0: int = 0x0006_1AE7
    xfam_fixed1: int = 0x3
    config_flags_fixed0: int = 0x7
    config_flags_fixed1: int = 0
    #: CPUID family/model/stepping per package (CPUID.1.EAX); Sapphire Rapids by default.
    cpu_fms: int = 0x000806F8
    #: CPUID_CONFIG: ((leaf, subleaf or 0xFFFFFFFF), (eax, ebx, ecx, edx) configurable bits).
    cpuid_config: tuple[tuple[tuple[int, int], tuple[int, int, int, int]], ...] = (
        ((0x1, 0xFFFFFFFF), (0, 0, 0x31044D88, 0xB8400000)),
        ((0x7, 0x0), (0, 0xDC2EE7B, 0x18427F65, 0x1A0C0410)),
        ((0xD, 0x0), (0x60200, 0, 0, 0)),
        ((0xD, 0x1), (0x1E, 0, 0x1800, 0)),
        ((0x80000008, 0xFFFFFFFF), (0xFF00FF, 0, 0, 0)),
    )

    @classmethod
    def from_vm(cls, smp: int, mem_bytes: int, **overrides: Any) -> Profile:
        """Profile for a q35 VM with ``smp`` vCPUs and ``mem_bytes`` of RAM."""
        ram = q35_ram_layout(mem_bytes)
        base = cls(num_lps=smp, ram=ram, cmrs=ram)
        return replace(base, **overrides) if overrides else base

    @classmethod
    def named(cls, name: str, smp: int, mem_bytes: int, features: str = "") -> Profile:
        """The profile ``name`` (see ``PROFILES``) for a q35 VM, with ``features`` applied."""
        if name not in PROFILES:
            raise VtdxError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})")
        base = cls.from_vm(smp, mem_bytes, name=name, **PROFILES[name])
        return base.with_features(features) if features else base

    def with_features(self, spec: str) -> Profile:
        """Apply ``+name,-name,...`` (a bare ``name`` means ``+name``) to the module features."""
        changes: dict[str, bool] = {}
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            on = not item.startswith("-")
            name = item.lstrip("+-")
            if name not in FEATURES:
                raise VtdxError(f"unknown feature {name!r} (choose from "
                                f"{', '.join(sorted(FEATURES))})")
            changes[FEATURES[name]] = on
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]

    @property
    def features(self) -> dict[str, bool]:
        """Every switchable module feature by its user-facing name, on or off."""
        return {name: bool(getattr(self, attr)) for name, attr in FEATURES.items()}

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.ram)

    @property
    def tdx_keyid_start(self) -> int:
        return self.mktme_keyids + 1

    @property
    def lps_per_package(self) -> int:
        return max(1, self.num_lps // self.num_packages)

    def package_of(self, lp: int) -> int:
        return min(lp // self.lps_per_package, self.num_packages - 1)

    @property
    def features0(self) -> int:
        """TDX_FEATURES0 as the module reports it (bit numbers: vtdx.abi.fields)."""
        bits = {
            f.FEATURES0_TD_PRESERVING: self.td_preserving,
            f.FEATURES0_NO_RBP_MOD: self.no_rbp_mod,
            f.FEATURES0_TOPOLOGY_ENUM: self.topology_enum,
            f.FEATURES0_DYNAMIC_PAMT: self.dynamic_pamt,
            f.FEATURES0_DEMOTE_NOINTERRUPT: self.demote_nointerrupt,
            f.FEATURES0_SYS_DISABLE: self.sys_disable,
        }
        return sum(bit for bit, on in bits.items() if on)

    @property
    def hkid_start_bit(self) -> int:
        """Lowest physical-address bit that carries the keyid."""
        return self.phys_bits - self.keyid_bits

    @property
    def tdx_keyid_end(self) -> int:
        """One past the last TDX private keyid."""
        return self.tdx_keyid_start + self.tdx_keyids

    def to_dict(self) -> dict[str, object]:
        """Plain data for inspection (QMP) and logs."""
        out: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in ("ram", "cmrs"):
                value = [{"base": r.base, "size": r.size} for r in value]
            out[name] = value
        out["features0"] = self.features0
        return out


#: Module features a user switches with ``--features +name,-name``: name -> Profile field.
#: Each is a TDX_FEATURES0 bit the module reports and whose behaviour the model follows.
FEATURES: dict[str, str] = {
    "dynamic-pamt": "dynamic_pamt",            # bit 36: PAMT.ADD/REMOVE, 4K PAMT on demand
    "demote-nointerrupt": "demote_nointerrupt",  # bit 51: DEMOTE never interrupted
    "no-rbp-mod": "no_rbp_mod",                # bit 18: the module preserves RBP
    "topology-enum": "topology_enum",          # bit 20: KVM requires it for any TD
    "sys-disable": "sys_disable",              # bit 53: TDH.SYS.DISABLE exists
    "td-preserving": "td_preserving",          # bit 1: TD-preserving module update
}

#: Named platforms (``--profile NAME``): overrides of the default profile. ``dpamt`` is what
#: a kernel carrying Dynamic PAMT needs; a kernel without it still boots on static PAMT
#: (TDH.SYS.CONFIG turns Dynamic PAMT on only when the kernel asks for it).
PROFILES: dict[str, dict[str, object]] = {
    "default": {},
    "dpamt": {"generation": "dpamt", "dynamic_pamt": True, "demote_nointerrupt": True},
    # Platforms that lack what Linux needs; the kernel refuses TDX the way it would on hardware.
    "no-movdir64b": {"movdir64b": False},
    "one-keyid": {"tdx_keyids": 1},
}
